"""`lora-dpo plan`: peak GPU memory of a training config, estimated from the model's config.json.

No weights are read and no GPU is needed. The estimate is for one micro-batch in the padded
layout whose rows all reach data.max_length (so an attention mask exists), every token a
response token. The packed layouts (`train.layout`; packed is `auto`'s choice for Llama,
Mistral and Qwen2) put the same pairs in no more tokens (the prompt once) and, with
FlexAttention on CUDA, build no [L, L] mask and expand no key or value, so the padded figure
bounds them from above; the pairwise fallback keeps one dense [n, n] mask per pair of n tokens,
at most 2 x max_length^2 x (compute dtype) bytes more per pair than the padded mask.

- persistent: nf4 linear layers (4 bits + an 8-bit scale per 64 weights, double quantization),
  embeddings, norms and the LM head in the compute dtype; LoRA weights in fp32; the
  optimizer's state;
- activations: with gradient checkpointing, each layer's input [2B, T, H] (kept on the host
  with train.offload_activations), then the larger of two moments: the LM head (one logits
  chunk, the final hidden states and their gradients) and the backward of a layer (its
  recomputed activations, the transients of its backward, the attention mask, and the fp32
  LoRA gradients of the layers already done). Without checkpointing, every layer's activations;
- CUDA-only terms, which no tensor accounts for (`cuda_only_terms`).

Per device: on CUDA the LoRA branch runs under autocast (its saved tensors in the compute
dtype, `lora_under_autocast`) and dropout keeps a bool mask; on the CPU both are fp32, as measured.
Under torchrun the figure is per rank, with DDP's gradient buckets (`ddp_bucket_bytes`).

Weight counts are exact (tested against real models). The activation model counts the tensors
the real code path saves (transformers' Llama-style layer, peft's LoRA, bitsandbytes' 4-bit
matmul, torch's sdpa) and was checked against live tensor bytes measured on the CPU at the
recipes' real widths with 1 and 2 layers (benchmarks/memory_check.py, benchmarks/memory.md);
a test keeps the two in agreement on a small model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lora_dpo.adapter_start import adapter_shape
from lora_dpo.architecture import Architecture
from lora_dpo.config import Config
from lora_dpo.errors import ConfigError

GIB = 2**30
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, uint8 absmax per 64, fp32 per 256 blocks
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}  # auto = bf16 on CUDA
# Bytes per element of the dropout mask that backward keeps: a bool mask, from CUDA's fused
# dropout and from lora_dpo.dropout.Dropout16 on the CPU.
DROPOUT_MASK_BYTES = 1
# torch's checkpoint keeps the CPU generator's state per layer to replay dropout when it
# recomputes; CUDA's generator state is small and lives on the host, so none is on the GPU.
CHECKPOINT_RNG_STATE_BYTES = {"cuda": 0, "cpu": 5056}
# bitsandbytes keeps 32-bit optimizer state for tensors smaller than this (min_8bit_size).
MIN_8BIT_SIZE = 4096
# lora_dpo.ddp builds DistributedDataParallel with gradient_as_bucket_view=True: the gradients
# are views into its buckets, so the buckets are no second copy.
DDP_GRADIENT_AS_BUCKET_VIEW = True


def lora_under_autocast(config: Config, device: str) -> bool:
    """Whether the LoRA branch saves bf16 tensors and no fp32 copy of its input. A bf16 decoder
    runs under bf16 autocast (lora_dpo.logps.decoder_autocast), and on CUDA peft then leaves
    each LoRA input as it is. peft asks `torch.is_autocast_enabled()`, which is CUDA's, so on
    the CPU it still casts the input to the adapter's fp32 first (what memory_check measures,
    at bf16): the CPU is modelled at fp32. fp16 runs without autocast. `auto` is bf16 on CUDA."""
    return device == "cuda" and config.model.dtype in ("bf16", "auto")


def dropout_mask_bytes(config: Config) -> int:
    """Bytes per element of the LoRA input's dropout mask backward keeps (none without dropout)."""
    return DROPOUT_MASK_BYTES if config.lora.dropout > 0 else 0


def lora_activation_bytes(config: Config, device: str) -> int:
    """Bytes per element of what the LoRA branch saves: bf16's 2 under autocast, else the
    adapter's fp32 (4)."""
    return 2 if lora_under_autocast(config, device) else 4


@dataclass(frozen=True)
class Workload:
    """One micro-batch: `rows` sequences (2B: chosen and rejected) padded to `length` tokens,
    `response_tokens` of them scored; `padded` rows of different lengths need a mask."""

    rows: int
    length: int
    response_tokens: int
    padded: bool = True

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @classmethod
    def worst_case(cls, config: Config, length: int | None = None) -> Workload:
        rows, length = 2 * config.train.per_device_batch_size, length or config.data.max_length
        return cls(rows, length, rows * (length - 1))


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: float
    kind: str  # "persistent", "activations" or "cuda" (see cuda_only_terms)
    counted: bool = True  # False: an activation moment smaller than the peak, shown for reference


@dataclass
class MemoryPlan:
    items: list[PlanItem]
    host_bytes: float = 0.0  # pinned host memory for offloaded activations

    def part(self, *kinds: str) -> float:
        return sum(i.bytes for i in self.items if i.counted and i.kind in kinds)

    @property
    def total(self) -> float:
        return self.part("persistent", "activations", "cuda")

    @property
    def tensor_bytes(self) -> float:
        """What live tensors account for (what memory_check measures; CUDA terms excluded)."""
        return self.part("persistent", "activations")

    def render(self, gpu_gib: float) -> str:
        width = max(len(item.name) for item in self.items)
        lines = [
            f"{item.name:<{width}}  {item.bytes / GIB:7.2f} GiB"
            + ("" if item.counted else "  (not at the peak)")
            for item in self.items
        ]
        lines.append(f"{'total (peak, estimated)':<{width}}  {self.total / GIB:7.2f} GiB")
        if self.host_bytes:
            lines.append(
                f"{'host memory, offloaded activations (pinned)':<{width}}  {self.host_bytes / GIB:7.2f} GiB"
            )
        spare = gpu_gib - self.total / GIB
        verdict = (
            f"fits a {gpu_gib:g} GiB card with {spare:.1f} GiB to spare"
            if spare >= 0
            else f"does NOT fit a {gpu_gib:g} GiB card ({-spare:.1f} GiB over): lower "
            "train.per_device_batch_size or data.max_length, or set train.offload_activations=true"
        )
        return "\n".join(lines + [verdict])


def optimizer_state_bytes(arch: Architecture, config: Config) -> tuple[str, float]:
    name = "paged_adamw_8bit" if config.train.optimizer == "auto" else config.train.optimizer  # auto on CUDA
    sizes = arch.lora_tensor_sizes(config.lora.r, config.lora.target_modules)
    if name == "adamw_torch":
        per_layer = sum(8 * n for n in sizes)
    else:  # 8-bit m and v with an fp32 absmax per 256; small tensors keep fp32 m and v
        per_layer = sum(2 * n + 8 * -(-n // 256) if n >= MIN_8BIT_SIZE else 8 * n for n in sizes)
    return name, arch.num_layers * per_layer


def layer_saved_bytes_per_token(arch: Architecture, config: Config, workload: Workload, device: str) -> float:
    """Bytes per token that one layer's forward keeps for backward (Llama-style layer, peft LoRA
    with fp32 adapters on a bitsandbytes 4-bit base, torch sdpa).

    - the two RMSNorms keep their fp32 upcast input;
    - every LoRA-wrapped linear keeps a copy of its input (dropout or lora_A keeps it) plus the
      dropout mask, and lora_A's [r] output, each at `a` = lora_activation_bytes bytes per
      element: (a + mask)·in + a·r. On the CPU a = 4 (peft casts the input to the adapter's
      fp32); on CUDA the branch runs under autocast, a = the compute dtype's 2 bytes, which
      halves the term. The 4-bit base matmul keeps no activation (only its packed weight);
    - attention keeps the rotated query, the key and value (expanded to every query head when a
      mask rules out grouped-query sdpa), its output and the fp32 log-sum-exp per head;
    - the MLP keeps gate, up and act(gate).
    """
    d = DTYPE_BYTES[config.model.dtype]
    shapes = arch.linear_shapes()
    targets = arch.lora_targets(config.lora.target_modules)
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    mask = dropout_mask_bytes(config)
    a = lora_activation_bytes(config, device)
    lora = sum((a + mask) * shapes[n][0] + a * config.lora.r for n in targets)
    expanded = workload.padded and arch.num_kv_heads < arch.num_heads
    attention = d * (2 * q + (2 * q if expanded else 2 * kv)) + 4 * arch.num_heads
    return arch.norms_per_layer * 4 * h + lora + attention + 3 * d * i


def last_layer_backward_bytes(arch: Architecture, config: Config, workload: Workload, device: str) -> float:
    """Activation bytes at the backward of the last decoder layer, beyond the checkpoints.

    Its recomputed saved tensors, the layer's incoming gradient (compute dtype, and its copy
    at `a` = lora_activation_bytes for the LoRA branch: (d + a)·H), the residual, and the
    larger of two moments of its last linear layer:

    - the LoRA branch's recompute: the down projection's input cast for the adapter (4·I on
      the CPU, none under CUDA autocast, where the input is already in the compute dtype), the
      dropout output and mask ((a + mask)·I) and the output and its clone (2·d·H);
    - the base matmul's backward: bitsandbytes dequantizes a 4-bit weight ([out, in] at d) and
      multiplies the incoming gradient by it into the gradient of the layer's input
      ([tokens, in] at d), both alive at once: d·(out·in + tokens·in), the largest over the
      layer's linear layers (the down projection: the largest weight, the widest input).

    On the CPU the LoRA moment is the larger at every length memory_check measures; under CUDA
    autocast the LoRA branch halves and the dequantized moment can be the peak. A padded batch
    adds the attention mask: bool from transformers, and sdpa's additive copy in the compute
    dtype, which its backward keeps.
    """
    d = DTYPE_BYTES[config.model.dtype]
    tokens, h, i = workload.tokens, arch.hidden_size, arch.intermediate_size
    saved = layer_saved_bytes_per_token(arch, config, workload, device)
    a = lora_activation_bytes(config, device)
    transients = (d + a) * h + d * h + d * i  # incoming gradient, residual, down_proj input
    down_lora = 0.0
    if "down_proj" in arch.lora_targets(config.lora.target_modules):
        mask = dropout_mask_bytes(config)
        cast = 0 if lora_under_autocast(config, device) else 4  # peft's fp32 copy, without autocast
        # input copy, dropout output and mask, output + clone
        down_lora = cast * i + (a + mask) * i + 2 * d * h
        saved -= (a + mask) * i  # counted in this moment, not twice
    dequantized = 0.0
    if config.model.quantization == "nf4":
        # weight [out, in] and the gradient of its input [tokens, in]: down_proj's, at 8B
        dequantized = d * max(
            fan_in * fan_out + tokens * fan_in for fan_in, fan_out in arch.linear_shapes().values()
        )
    attention_mask = workload.rows * workload.length**2 * (1 + d) if workload.padded else 0
    return tokens * (saved + transients) + max(tokens * down_lora, dequantized) + attention_mask


def lm_head_bytes(arch: Architecture, config: Config, workload: Workload) -> tuple[int, float]:
    """(chunk, activation bytes at the LM head beyond the checkpoints): the final norm's fp32
    input and its output [2B, T, H], the response hidden states and their gradients [N, H],
    and one chunk of logits, C = min(train.logits_chunk_size, N) tokens (lora_dpo.logps's
    loop), at (d + 4)·C·V: the fused frozen-head path holds the fp32 logits [C, V] (turned in
    place into d log p / d logits), and for a moment a compute-dtype [C, V] beside them, the
    linear's product before its fp32 copy, or the gradient cast back for the matmul into
    d log p / d h. A product made in fp32 directly would leave the cast back: the same peak."""
    d = DTYPE_BYTES[config.model.dtype]
    h, n = arch.hidden_size, workload.response_tokens
    chunk = min(config.train.logits_chunk_size, n)
    return chunk, workload.tokens * h * (4 + d) + 2 * n * h * d + chunk * arch.vocab_size * (d + 4)


def cuda_only_terms(activations: float) -> list[PlanItem]:
    """What a CUDA card holds beyond live tensors; unmeasured here (benchmarks/gpu_check.py
    records them on a GPU: max_memory_reserved against max_memory_allocated).

    - the CUDA context and kernel images of torch, cuBLAS and bitsandbytes, outside the
      allocator: a fixed 0.5 GiB (about 500 MiB on recent drivers with lazy module loading,
      CUDA_MODULE_LOADING=LAZY, torch's default since CUDA 11.7; older eager loading takes more);
    - the caching allocator's reserve above live tensors: block rounding and fragmentation
      between activations of different shapes, taken as 10% of the activation peak, at least
      0.25 GiB (cuBLAS workspaces included).
    """
    return [
        PlanItem("CUDA context and kernels (outside the allocator)", 0.5 * GIB, "cuda"),
        PlanItem("CUDA allocator reserve above live tensors", max(0.25 * GIB, 0.1 * activations), "cuda"),
    ]


def ddp_bucket_bytes(arch: Architecture, config: Config, ranks: int) -> float:
    """DistributedDataParallel's gradient buckets over more than one rank: a second copy of the
    fp32 LoRA gradients, 4·(LoRA weights), unless gradient_as_bucket_view=True makes the
    gradients views into the buckets (then nothing more)."""
    if ranks <= 1 or DDP_GRADIENT_AS_BUCKET_VIEW:
        return 0.0
    return 4.0 * arch.lora_weights(config.lora.r, config.lora.target_modules)


def with_start_adapter(config: Config) -> tuple[Config, int]:
    """The config plan models, and the frozen LoRA weights it adds, for a run that starts from
    an SFT adapter (`model.adapter_path`). `continue` trains that adapter: its rank and target
    modules replace `lora.*`, without dropout (a start adapter runs without it). `stack` trains
    `lora.*` on top of it frozen: its fp32 weights are persistent; its branch keeps no
    activations for backward (frozen weights need none saved to pass the gradient to their
    input, and under autocast no fp32 copy of the input is made)."""
    if not config.model.adapter_path:
        return config, 0
    rank, names, weights = adapter_shape(config.model.adapter_path)
    if config.model.adapter_mode == "stack":
        return config, weights
    lora = dataclasses.replace(config.lora, r=rank, target_modules=list(names), dropout=0.0)
    return dataclasses.replace(config, lora=lora), 0


def estimate(
    config: Config, arch: Architecture, workload: Workload | None = None, device: str = "cuda", ranks: int = 1
) -> MemoryPlan:
    """The peak of one training micro-batch on `device` ("cuda", or "cpu" to compare with a CPU
    measurement: CPU dropout masks, the LoRA branch in fp32, and no CUDA-only terms), per rank
    of `ranks` (torchrun: each rank holds the whole model, and DDP's buckets)."""
    config, frozen_lora = with_start_adapter(config)
    cfg = config.train
    workload = workload or Workload.worst_case(config)
    d = DTYPE_BYTES[config.model.dtype]
    quantized = config.model.quantization == "nf4"
    tokens, h = workload.tokens, arch.hidden_size
    optimizer, optimizer_bytes = optimizer_state_bytes(arch, config)
    lora = arch.lora_weights(config.lora.r, config.lora.target_modules)
    items = [
        PlanItem(
            "base weights, linear layers (nf4)" if quantized else "base weights, linear layers",
            arch.linear_weights * (NF4_BYTES_PER_WEIGHT if quantized else d),
            "persistent",
        ),
        PlanItem("base weights, embeddings + LM head + norms", arch.other_weights * d, "persistent"),
        PlanItem("LoRA weights (fp32)", lora * 4, "persistent"),
        *(
            [PlanItem("SFT adapter weights, frozen (fp32)", frozen_lora * 4, "persistent")]
            if frozen_lora
            else []
        ),
        PlanItem(f"optimizer state ({optimizer})", optimizer_bytes, "persistent"),
    ]
    buckets = ddp_bucket_bytes(arch, config, ranks)
    if buckets:
        items.append(PlanItem("DDP gradient buckets (fp32 LoRA gradients)", buckets, "persistent"))
    layer = last_layer_backward_bytes(arch, config, workload, device)
    host = 0.0
    if cfg.gradient_checkpointing:
        # The backward of layer k holds the inputs of layers 0..k and the LoRA gradients of the
        # layers after k: its peak is at the last layer, or at the first when the gradients
        # outweigh the inputs (short sequences) or the inputs wait on the host.
        checkpoint = tokens * h * d + CHECKPOINT_RNG_STATE_BYTES[device]  # one layer's input [2B, T, H]
        gradients = 4 * lora / arch.num_layers  # one layer's LoRA gradients, fp32
        if cfg.offload_activations:
            host = arch.num_layers * checkpoint
            layer += checkpoint + (arch.num_layers - 1) * gradients
        else:
            items.append(
                PlanItem(
                    f"layer inputs kept for recompute ({arch.num_layers} x {tokens} tokens)",
                    arch.num_layers * checkpoint,
                    "activations",
                )
            )
            layer += max(0.0, (arch.num_layers - 1) * (gradients - checkpoint))
    else:  # every layer's saved tensors; with offload they wait on the host instead
        saved = (
            (arch.num_layers - 1)
            * (layer_saved_bytes_per_token(arch, config, workload, device) + h * d)
            * tokens
        )
        if cfg.offload_activations:
            host = saved
        else:
            items.append(
                PlanItem(
                    f"activations of {arch.num_layers - 1} more layers (no checkpointing)",
                    saved,
                    "activations",
                )
            )
    chunk, head = lm_head_bytes(arch, config, workload)
    head_at_peak = head > layer
    items += [
        PlanItem(
            "backward of a layer: recomputed activations, transients, mask, LoRA gradients",
            layer,
            "activations",
            not head_at_peak,
        ),
        PlanItem(
            f"LM head: one logits chunk ({chunk} tokens x {arch.vocab_size} vocab), final hidden states",
            head,
            "activations",
            head_at_peak,
        ),
    ]
    if device == "cuda":
        items += cuda_only_terms(sum(i.bytes for i in items if i.kind == "activations" and i.counted))
    return MemoryPlan(items, host)


def find_max_length(config: Config, arch: Architecture, gpu_gib: float, limit: int = 1 << 20) -> int:
    """The longest data.max_length (tokens per sequence of a pair, at the config's micro-batch)
    whose estimate fits `gpu_gib`; 0 when not even 2 tokens fit. The estimate grows with length."""

    def fits(length: int) -> bool:
        return estimate(config, arch, Workload.worst_case(config, length)).total <= gpu_gib * GIB

    low, high = 1, limit + 1  # fits(low) is taken as true; high never fits
    if not fits(2):
        return 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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


def run_plan(config: Config, model_config: str | None, gpu_gib: float, max_length: bool = False) -> str:
    arch = Architecture.from_config_json(find_model_config(config, model_config))
    if not max_length:
        return estimate(config, arch).render(gpu_gib)
    longest = find_max_length(config, arch, gpu_gib)
    batch = config.train.per_device_batch_size
    setting = f"{batch} pair{'s' if batch > 1 else ''} per micro-batch, offload_activations " + (
        "on" if config.train.offload_activations else "off"
    )
    if not longest:
        return f"no length fits a {gpu_gib:g} GiB card ({setting})"
    total = estimate(config, arch, Workload.worst_case(config, longest)).total
    return (
        f"longest data.max_length that fits a {gpu_gib:g} GiB card: {longest} tokens per sequence "
        f"({total / GIB:.2f} GiB estimated; {setting})"
    )
