"""Which batch layout a run uses (`train.layout`), and why: the fastest exact one the model takes.

- packed: several pairs to a row, each as prompt + chosen + rejected, no padding at all. With
  `max_tokens_per_batch` a micro-batch is one row of at most that many tokens.
- prompt_shared: one row per pair, prompt + chosen + rejected, right-padded to the longest pair.
- padded: chosen and rejected as separate rows, right-padded (every model, every attention).

`auto` picks packed where the architecture and its attention support it (lora_dpo.attention),
padded otherwise, and says why. All three give the same log-probs up to float rounding, so the
reference cache is valid whichever layout computed it and whichever one trains against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_dpo.attention import (
    PackedAttention,
    packing_problem,
    prepare_packed_attention,
    restore_unpacked_attention,
)
from lora_dpo.batching import COLLATE, LAYOUTS, PackedPairBatch, PairBatch
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import ConfigError

LAYOUT_CHOICES = ("auto", *LAYOUTS)
_WORDS = {
    "packed": "packed, prompt shared",
    "prompt_shared": "prompt shared, one pair per row",
    "padded": "padded, chosen and rejected in separate rows",
}


@dataclass(frozen=True)
class Layout:
    name: str  # one of LAYOUTS
    attention: PackedAttention | None = None  # how packed rows attend; None when padded
    fallback: str | None = None  # why `auto` did not pick packed

    def collate(self, pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch | PackedPairBatch:
        return COLLATE[self.name](pairs, pad_id)

    def describe(self, max_tokens: int, pairs_per_batch: int) -> str:
        """One line for the start of a run: `layout: packed, prompt shared, 4096 tokens per row`."""
        unit = "row" if self.name == "packed" else "batch"
        size = f"{max_tokens} tokens per {unit}" if max_tokens else f"{pairs_per_batch} pairs per {unit}"
        line = f"layout: {_WORDS[self.name]}, {size}"
        if self.attention is not None:
            if self.attention.backend == "flex":
                line += "; attention: FlexAttention block masks"
            else:
                line += (
                    f"; attention: pair by pair, causal kernels with masks per pair ({self.attention.notice})"
                )
        if self.fallback:
            line += f" (not packed: {self.fallback})"
        return line


def choose_layout(requested: str, model: torch.nn.Module, device: torch.device) -> Layout:
    """The layout for `train.layout=requested`, with `model` switched to the attention it needs.

    An explicit packed or prompt_shared on a model that cannot take it is a one-line error;
    `auto` falls back to padded and keeps the reason.
    """
    if requested not in LAYOUT_CHOICES:
        raise ConfigError(f"train.layout={requested!r}: must be one of {', '.join(LAYOUT_CHOICES)}")
    if requested == "padded":
        restore_unpacked_attention(model)
        return Layout("padded")
    problem = packing_problem(model)
    if problem is not None:
        if requested == "auto":
            return Layout("padded", fallback=problem)
        raise ConfigError(f"train.layout={requested}: {problem}; use train.layout=padded or auto")
    attention = prepare_packed_attention(model, device)
    return Layout("packed" if requested == "auto" else requested, attention)
