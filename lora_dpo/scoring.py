"""Score pairs with a frozen model: summed response log-probs and token counts, in pair order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.batching import COLLATE, token_budget_batches
from lora_dpo.data import TokenizedPair
from lora_dpo.logps import sequence_logps


@dataclass(frozen=True)
class PairScores:
    """Row i belongs to the i-th pair scored."""

    chosen: torch.Tensor  # [N] fp32, summed log-probs of the chosen response
    rejected: torch.Tensor  # [N] fp32
    chosen_tokens: torch.Tensor  # [N] response token counts
    rejected_tokens: torch.Tensor  # [N]
    # [2N] chosen rows then rejected ones: sequence_logps's optional statistics, when asked for
    shared_logps: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def scoring_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, layout: str = "padded", max_tokens: int = 0
) -> list[list[int]]:
    """Consecutive batches in pair order: of at most `max_tokens` decoder tokens in `layout`
    when it is set, of `batch_size` pairs otherwise."""
    if max_tokens:
        return token_budget_batches(pairs, range(len(pairs)), layout, max_tokens)
    return [
        list(range(start, min(start + batch_size, len(pairs)))) for start in range(0, len(pairs), batch_size)
    ]


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: Any = None,
    layout: str = "padded",
    max_tokens: int = 0,
    batches: Sequence[Sequence[int]] | None = None,
    **statistics: bool,
) -> PairScores:
    """Consecutive batches (`scoring_batches`) in the given order (sort the pairs by length
    first for little padding), collated in `layout` (lora_dpo.packing.choose_layout prepares
    the model for it). `progress` (a tqdm bar) is advanced by the pairs scored. `statistics`
    are sequence_logps's optional ones (shared_prefix=True, ...). `batches` (index lists into
    `pairs`) replaces those batches: rows then come in their order."""
    # Kept on the device and moved once at the end: a copy to the host per batch would wait
    # for each batch's forward before the next one is queued.
    logps: list[torch.Tensor] = []  # [2, b] per batch: chosen, rejected
    tokens: list[torch.Tensor] = []
    extra: dict[str, list[torch.Tensor]] = {"shared_logps": [], "log_sum_sq_probs": []}
    if batches is None:
        batches = scoring_batches(pairs, batch_size, layout, max_tokens)
    for indices in batches:
        batch = COLLATE[layout]([pairs[i] for i in indices], pad_id).to(device)
        out = sequence_logps(model, batch, **statistics)
        logps.append(out.logps.view(2, -1))
        tokens.append(out.tokens.view(2, -1))
        for name, parts in extra.items():
            value = getattr(out, name)
            if value is not None:
                parts.append(value.view(2, -1))
        if progress is not None:
            progress.update(batch.num_pairs)
    chosen, rejected = torch.cat(logps, dim=1).cpu()  # [N] each
    chosen_tokens, rejected_tokens = torch.cat(tokens, dim=1).cpu()
    stacked = {
        name: torch.cat(parts, dim=1).cpu().flatten() if parts else None for name, parts in extra.items()
    }
    return PairScores(chosen, rejected, chosen_tokens, rejected_tokens, **stacked)
