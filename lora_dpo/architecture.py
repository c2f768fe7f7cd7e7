"""What a memory estimate needs from a model's config.json: the widths and counts of a
Llama-style decoder (Llama, Mistral, Qwen2, Gemma), read through transformers without weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lora_dpo.errors import ConfigError

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
    def from_config_json(cls, path: str | Path) -> Architecture:
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

    def with_layers(self, num_layers: int) -> Architecture:
        """The same widths with another depth (the 1- and 2-layer models memory_check measures)."""
        return dataclasses.replace(self, num_layers=num_layers)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, i, q, kv = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
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

    def lora_targets(self, targets: list[str]) -> list[str]:
        shapes = self.linear_shapes()
        return list(LINEAR_NAMES) if targets == ["all-linear"] else [t for t in targets if t in shapes]

    def lora_tensor_sizes(self, r: int, targets: list[str]) -> list[int]:
        """Elements of each LoRA A and B matrix of one layer."""
        shapes = self.linear_shapes()
        return [size for n in self.lora_targets(targets) for size in (r * shapes[n][0], r * shapes[n][1])]

    def lora_weights(self, r: int, targets: list[str]) -> int:
        return self.num_layers * sum(self.lora_tensor_sizes(r, targets))
