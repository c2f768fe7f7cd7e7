"""Preference data: read rows from any source, normalise the three formats, tokenize, report.

The stages live in their own modules: `lora_dpo.sources` reads rows, `formats` turns a row
into prompt and response text (explicit, implicit or conversational), `tokenize` turns text
into ids by the tokenization rules, and `report` counts what was dropped and why.

Validation: a row that cannot become a pair (unreadable line, missing or mistyped field, empty
prompt or response, identical responses, ill-formed conversation, nothing left after
truncation) is dropped and counted by reason, with the line (JSON Lines, CSV) or row of the
first few and what is wrong with each; with `data.strict` the first one is a DataError instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_dpo.config import DataConfig
from lora_dpo.data.formats import (
    FORMATS,
    UNPAIRED_FORMATS,
    TextPair,
    detect_format,
    normaliser,
    resolve_format,
    row_texts,
    split_implicit,
)
from lora_dpo.data.report import (
    BAD_LABEL,
    BAD_ROLES,
    DIALOGUES_DIFFER,
    DROP_REASONS,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    INVALID_JSON,
    MALFORMED_ROW,
    MISSING_FIELD,
    NO_FINAL_ASSISTANT_TURN,
    NOT_AN_OBJECT,
    NOT_UTF8,
    NOTHING_LEFT,
    TEMPLATE_REJECTED,
    DataReport,
    Drop,
    length_stats,
)
from lora_dpo.data.tokenize import (
    TOKENIZE_CHUNK,
    TokenizedPair,
    finish_pair,
    require_eos,
    special_prefix,
    tokenization_settings,
    tokenize_chunk,
    tokenizer_fingerprint,
)
from lora_dpo.data.unpaired import UnpairedRow, build_unpaired_rows, labels_of
from lora_dpo.errors import DataError
from lora_dpo.sources import read_source

__all__ = [
    "BAD_LABEL",
    "BAD_ROLES",
    "DIALOGUES_DIFFER",
    "DROP_REASONS",
    "EMPTY_PROMPT",
    "EMPTY_RESPONSE",
    "IDENTICAL_RESPONSES",
    "INVALID_JSON",
    "MALFORMED_ROW",
    "MISSING_FIELD",
    "NOTHING_LEFT",
    "NOT_AN_OBJECT",
    "NOT_UTF8",
    "NO_FINAL_ASSISTANT_TURN",
    "TEMPLATE_REJECTED",
    "DataReport",
    "TokenizedPair",
    "UNPAIRED_FORMATS",
    "UnpairedRow",
    "build_pairs",
    "build_unpaired_rows",
    "detect_format",
    "labels_of",
    "load_preference_data",
    "no_pairs_message",
    "special_prefix",
    "split_implicit",
    "tokenization_settings",
    "tokenizer_fingerprint",
]


def build_pairs(
    rows: Sequence[Any],
    tokenizer: Any,
    cfg: DataConfig,
    source: str,
    *,
    lines: Sequence[int] | None = None,
) -> tuple[list[TokenizedPair], DataReport]:
    """Validate, normalise, tokenize and fit each row.

    A row that cannot become a pair is counted in the report under its reason, with where it
    is (`lines`: the 1-based line of each row in its file, when it has lines) and what is
    wrong; with `cfg.strict` the first such row is a DataError instead.
    """
    require_eos(tokenizer)
    fmt = resolve_format(cfg.format, rows)
    if fmt in UNPAIRED_FORMATS:
        raise DataError(
            f"{source}: the rows are unpaired (prompt, completion, label): they train with "
            "train.loss_type=kto; the other loss types read preference pairs (chosen, rejected)"
        )
    report = DataReport(source=source, format=fmt, total=len(rows))
    normalise = normaliser(fmt, tokenizer) if fmt in FORMATS else None
    texts: list[tuple[int, TextPair]] = row_texts(rows, normalise, report, cfg.strict, lines)
    pairs: list[TokenizedPair] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        ids = tokenize_chunk(tokenizer, [t for _, t in chunk], chat=fmt == "conversational")
        for (index, text), pair_ids in zip(chunk, ids):
            try:
                pair, cut = finish_pair(index, text, pair_ids, tokenizer, cfg)
            except Drop as problem:
                report.drop_row(index, problem, cfg.strict, lines)
                continue
            pairs.append(pair)
            report.truncated += cut
    report.kept = len(pairs)
    report.lengths = length_stats(pairs)
    return pairs, report


def load_preference_data(
    cfg: DataConfig,
    tokenizer: Any,
    split: str = "train",
    *,
    allow_empty: bool = False,
    unpaired: bool = False,
) -> tuple[list[TokenizedPair], DataReport]:
    """Pairs and report of the train or eval split: the validation pass that precompute-ref
    and train run before any model work. A DataError when no pair survives, unless
    `allow_empty` (for `lora-dpo data check`, which prints the report first). With `unpaired`
    (train.loss_type=kto): KTO's UnpairedRows, pairs split into them (lora_dpo.data.unpaired)."""
    if split == "train":
        path, source_split = cfg.train_path, cfg.train_split
    elif split == "eval":
        path, source_split = cfg.eval_path, cfg.eval_split
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not path:
        raise DataError(f"data.{split}_path is empty: no {split} data configured")
    source = read_source(path, source_split, cfg.max_row_bytes)
    rows, lines = source.rows, source.lines
    if cfg.max_pairs > 0:
        rows = rows[: cfg.max_pairs]
        lines = lines[: cfg.max_pairs] if lines is not None else None
    if unpaired:
        unpaired_rows, report = build_unpaired_rows(rows, tokenizer, cfg, source=path, lines=lines)
        pairs: list[TokenizedPair] = list(unpaired_rows)
    else:
        pairs, report = build_pairs(rows, tokenizer, cfg, source=path, lines=lines)
    if not pairs and not allow_empty:
        raise DataError(no_pairs_message(report))
    return pairs, report


def no_pairs_message(report: DataReport) -> str:
    why = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items()) or "no rows"
    first = f"; first: {report.first_problem()}" if report.dropped else ""
    kind = "unpaired row" if report.format in UNPAIRED_FORMATS else "preference pair"
    return f"{report.source}: no usable {kind} out of {report.total} rows ({why}{first})"
