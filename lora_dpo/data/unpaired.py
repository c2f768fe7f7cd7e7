"""KTO's unpaired rows: a prompt, one completion, its label, and the mismatched KL completion.

Rows come as `{"prompt", "completion", "label": bool}` (text, or message lists, rendered with
the chat template), or as preference pairs of any format, split as TRL's
`unpair_preference_dataset` splits them: per batch of UNPAIR_CHUNK pairs, every chosen
completion (desirable) and then every rejected one (undesirable), each with its prompt.

The KL completion: KTO estimates KL(πθ‖πref) from completions paired with prompts they do not
belong to. As TRL, the completions are rotated by one: row k (in the order above, after drops)
takes the completion of row k-1, and the first row that of the last. TRL rotates within each
batch of per_device_train_batch_size at dataset preparation; here the rotation runs over the
whole split, so the pairing is fixed by the data alone, not by a training setting, and the
reference cache holds every row's reference log-prob of its KL completion beside that of its
completion. Training reads the same rows, so the policy scores the very pairs the cache did.

An UnpairedRow is laid out as a TokenizedPair, the completion in the chosen slot and the KL
completion in the rejected slot: scoring, the cache and every batch layout carry it as they
carry a pair (the KL completion, like a rejected response, sees the prompt alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lora_dpo.config import DataConfig
from lora_dpo.data.formats import (
    FORMATS,
    UNPAIRED_FORMATS,
    CompletionText,
    resolve_format,
    row_texts,
    unpaired_normaliser,
)
from lora_dpo.data.report import DataReport, Drop, length_stats
from lora_dpo.data.tokenize import (
    TOKENIZE_CHUNK,
    TokenizedPair,
    finish_completion,
    require_eos,
    tokenize_completions,
)

if TYPE_CHECKING:
    import torch

# TRL's unpair_preference_dataset maps batches of 1000 pairs (datasets' default batch size).
UNPAIR_CHUNK = 1000
# Recorded in the cache manifest: how each row's KL completion was chosen.
KL_PAIRING = "previous_row_completion_over_the_split"


@dataclass(frozen=True)
class UnpairedRow(TokenizedPair):
    """One KTO row: `chosen_ids` holds its completion, `rejected_ids` its KL completion."""

    label: bool = True  # True: desirable

    HASH_DOMAIN: ClassVar[bytes] = b"lora-dpo/unpaired/v1"

    @property
    def completion_ids(self) -> tuple[int, ...]:
        return self.chosen_ids

    @property
    def kl_completion_ids(self) -> tuple[int, ...]:
        return self.rejected_ids


def labels_of(rows: Sequence[Any]) -> torch.Tensor | None:
    """[B] bool, True for the desirable rows; None for preference pairs (which have no label)."""
    import torch  # here: the data layer imports without torch

    if not rows or not isinstance(rows[0], UnpairedRow):
        return None
    return torch.tensor([row.label for row in rows], dtype=torch.bool)


def _unpaired_order(
    texts: list[tuple[int, list[CompletionText]]], split_pairs: bool
) -> list[tuple[int, CompletionText]]:
    """(source row, text) of every unpaired text, in TRL's order (module docstring)."""
    if not split_pairs:
        return [(index, text) for index, parts in texts for text in parts]
    order: list[tuple[int, CompletionText]] = []
    for start in range(0, len(texts), UNPAIR_CHUNK):
        chunk = texts[start : start + UNPAIR_CHUNK]
        order += [(index, parts[0]) for index, parts in chunk]  # the chosen completions
        order += [(index, parts[1]) for index, parts in chunk]  # then the rejected ones
    return order


def build_unpaired_rows(
    rows: Sequence[Any],
    tokenizer: Any,
    cfg: DataConfig,
    source: str,
    *,
    lines: Sequence[int] | None = None,
) -> tuple[list[UnpairedRow], DataReport]:
    """Validate, normalise (splitting pairs), tokenize, pair with KL completions and fit each
    row, as `build_pairs` does for pairs: bad rows are dropped by reason into the report (a
    pair's reason drops both its rows), or with `cfg.strict` the first is a DataError."""
    require_eos(tokenizer)
    fmt = resolve_format(cfg.format, rows)
    report = DataReport(source=source, format=fmt, total=len(rows))
    known = fmt in FORMATS or fmt in UNPAIRED_FORMATS
    normalise = unpaired_normaliser(fmt, tokenizer) if known else None
    texts = _unpaired_order(row_texts(rows, normalise, report, cfg.strict, lines), fmt in FORMATS)
    chat = report.conversational
    kept: list[tuple[int, CompletionText, list[int], list[int]]] = []  # row, text, prompt, completion
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        ids = tokenize_completions(tokenizer, [text for _, text in chunk], chat)
        for (index, text), row_ids in zip(chunk, ids):
            try:
                prompt, completion, cut = finish_completion(text, row_ids, tokenizer, cfg)
            except Drop as problem:
                report.drop_row(index, problem, cfg.strict, lines)
                continue
            kept.append((index, text, prompt, completion))
            report.truncated += cut
    unpaired: list[UnpairedRow] = []
    for k, (index, text, prompt, completion) in enumerate(kept):
        # The row is fitted alone; its KL completion takes the room left after its prompt (cut
        # from the right, as TRL cuts a KL sequence), so a neighbour never cuts the row itself.
        kl_completion = kept[k - 1][3][: cfg.max_length - len(prompt)]  # k = 0 takes the last row's
        unpaired.append(
            UnpairedRow(tuple(prompt), tuple(completion), tuple(kl_completion), index, text.label)
        )
    report.kept = len(unpaired)
    report.lengths = length_stats(unpaired, ("completion", "kl_completion"))
    return unpaired, report
