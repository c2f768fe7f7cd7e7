"""`lora-dpo plan`: peak GPU memory of a training config, estimated from the model's config.json.

No weights are read and no GPU is needed. The estimate is a worst case for one micro-batch
whose pairs all reach data.max_length, with every token a response token:

- weights at their precision: nf4 linear layers (4 bits + one 8-bit scale per 64 weights,
  double quantization), embeddings, norms and the LM head in the compute dtype;
- LoRA weights and their gradients in fp32, and the optimizer's state (paged 8-bit AdamW:
  2 bytes per weight; torch AdamW: 8);
- activations: with gradient checkpointing, one [tokens, hidden] checkpoint per layer plus one
  layer recomputed in backward; without it, every layer's activations;
- one LM-head chunk of logits (bf16 product, fp32 copy, bf16 gradient) and the per-token
  hidden states and gradients around it;
- one dequantized linear weight at a time, and a fixed CUDA context / allocator allowance.

Counts of weights are exact (tested against real models); activation bytes per token are an
estimate from the saved tensors of a Llama-style layer with LoRA on every linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_dpo.config import Config
from lora_dpo.errors import ConfigError

GIB = 2**30
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, uint8 absmax per 64, fp32 per 256 blocks
CUDA_CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}  # auto = bf16 on CUDA
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_torch": 8}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs from config.json (Llama-style decoders: Llama, Mistral, Qwen2, Gemma)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v biases
    norms_per_layer: int

    @classmethod
    def from_config_json(cls, path: str | Path) -> "Architecture":
        """Through transformers' config class, so per-architecture defaults apply (no weights read)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path)).get_text_config()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a model config.json ({exc})") from None
        try:
            hidden, heads = config.hidden_size, config.num_attention_heads
            return cls(
                vocab_size=config.vocab_size,
                hidden_size=hidden,
                intermediate_size=config.intermediate_size,
                num_layers=config.num_hidden_layers,
                num_heads=heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or hidden // heads,
                tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and no flag for them
                attention_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
                # Gemma 2 and 3 norm before and after both attention and MLP
                norms_per_layer=4 if config.model_type in ("gemma2", "gemma3_text") else 2,
            )
        except AttributeError as exc:
            raise ConfigError(f"{path}: {exc}; plan knows Llama-style decoder configs") from None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def linear_weights(self) -> int:  # quantized to nf4
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_weights(self) -> int:
        """Embeddings, LM head, norms, biases: kept in the compute dtype."""
        shapes = self.linear_shapes()
        biases = shapes["q_proj"][1] + 2 * shapes["k_proj"][1] if self.attention_bias else 0
        heads = 1 if self.tie_word_embeddings else 2
        return (
            heads * self.vocab_size * self.hidden_size
            + self.num_layers * (self.norms_per_layer * self.hidden_size + biases)
            + self.hidden_size  # the final norm
        )

    def lora_weights(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        names = LINEAR_NAMES if targets == ["all-linear"] else [t for t in targets if t in shapes]
        return self.num_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    def activation_bytes_per_token(self, dtype_bytes: int) -> float:
        """Saved tensors of one layer's forward, per token: norms (fp32 internals), LoRA dropout
        copies of every linear's input, q/k/v and their rotary copies, attention output, MLP."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        hidden_terms = 2 * (h + 4 / dtype_bytes * h + h)  # two RMSNorms: input, fp32 copy, output
        hidden_terms += 5 * h * (1 + 1 / dtype_bytes)  # dropout copies + masks: q, k, v, gate, up
        attention = (q + 2 * kv) + (q + kv) + q + q * (1 + 1 / dtype_bytes) + h  # qkv, rope, out, o in, residual
        mlp = 2 * i + i + i + i * (1 + 1 / dtype_bytes)  # gate, up, act, product, down input copy
        return dtype_bytes * (hidden_terms + attention + mlp)


@dataclass
class MemoryPlan:
    items: list[tuple[str, float]]  # (what, bytes)

    @property
    def total(self) -> float:
        return sum(size for _, size in self.items)

    def render(self, gpu_gib: float) -> str:
        width = max(len(name) for name, _ in self.items)
        lines = [f"{name:<{width}}  {size / GIB:7.2f} GiB" for name, size in self.items]
        lines.append(f"{'total (peak, estimated)':<{width}}  {self.total / GIB:7.2f} GiB")
        spare = gpu_gib - self.total / GIB
        verdict = (
            f"fits a {gpu_gib:g} GiB card with {spare:.1f} GiB to spare"
            if spare >= 0
            else f"does NOT fit a {gpu_gib:g} GiB card ({-spare:.1f} GiB over): lower "
            "train.per_device_batch_size, data.max_length or train.logits_chunk_size"
        )
        return "\n".join(lines + [verdict])


def estimate(config: Config, arch: Architecture) -> MemoryPlan:
    cfg = config.train
    dtype = DTYPE_BYTES[config.model.dtype]
    quantized = config.model.quantization == "nf4"
    tokens = 2 * cfg.per_device_batch_size * config.data.max_length  # [2B, T], worst case
    lora = arch.lora_weights(config.lora.r, config.lora.target_modules)
    per_layer = arch.activation_bytes_per_token(dtype) * tokens
    checkpoints = arch.num_layers * tokens * arch.hidden_size * dtype
    activations = checkpoints + per_layer if cfg.gradient_checkpointing else arch.num_layers * per_layer
    chunk = min(cfg.logits_chunk_size, tokens)
    optimizer = "paged_adamw_8bit" if cfg.optimizer == "auto" else cfg.optimizer  # auto on CUDA
    largest_linear = max(a * b for a, b in arch.linear_shapes().values())
    items = [
        ("base weights, linear layers (nf4)" if quantized else "base weights, linear layers",
         arch.linear_weights * (NF4_BYTES_PER_WEIGHT if quantized else dtype)),
        ("base weights, embeddings + LM head + norms", arch.other_weights * dtype),
        ("LoRA weights + gradients (fp32)", lora * 8),
        (f"optimizer state ({optimizer})", lora * OPTIMIZER_STATE_BYTES[optimizer]),
        ("activations (checkpointed)" if cfg.gradient_checkpointing else "activations", activations),
        ("final hidden states, their gradients, per-token head gradients", 4 * tokens * arch.hidden_size * dtype),
        (f"one logits chunk ({chunk} tokens x {arch.vocab_size} vocab)", chunk * arch.vocab_size * (2 * dtype + 4)),
        ("one dequantized linear weight" if quantized else "", largest_linear * dtype if quantized else 0),
        ("CUDA context and allocator slack", CUDA_CONTEXT_BYTES),
    ]
    return MemoryPlan([(name, size) for name, size in items if name])


def find_model_config(config: Config, override: str | None) -> Path:
    """config.json: given, in model.name_or_path, or in the local Hugging Face cache."""
    if override:
        path = Path(override)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--model-config {override}: no such config.json")
        return path
    local = Path(config.model.name_or_path) / "config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(config.model.name_or_path, "config.json")
    except Exception:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    raise ConfigError(
        f"model.name_or_path={config.model.name_or_path!r}: plan needs its config.json; download just "
        f"that file (huggingface-cli download {config.model.name_or_path} config.json) or pass --model-config"
    )


def run_plan(config: Config, model_config: str | None, gpu_gib: float) -> str:
    arch = Architecture.from_config_json(find_model_config(config, model_config))
    return estimate(config, arch).render(gpu_gib)
