"""The data report: every dropped row counted under its reason, where it is, what is wrong.

A row that cannot become a pair raises `Drop` inside the data layer; `build_pairs` records it
here (or, with `data.strict`, turns the first into a DataError).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_dpo.errors import DataError
from lora_dpo.sources import INVALID_JSON, MALFORMED_ROW, NOT_AN_OBJECT, NOT_UTF8, ROW_TOO_LARGE

if TYPE_CHECKING:
    from lora_dpo.data.tokenize import TokenizedPair

# Rows kept per reason, with their lines and details, for the report.
EXAMPLES_PER_REASON = 5

# Drop reasons, the report's keys (the reading layer adds invalid_json, not_utf8,
# not_an_object, malformed_row and row_too_large).
MISSING_FIELD = "missing_field"  # absent, null, or not of the type the format needs
EMPTY_RESPONSE = "empty_response"
EMPTY_PROMPT = "empty_prompt"
IDENTICAL_RESPONSES = "identical_responses"
DIALOGUES_DIFFER = "dialogues_differ_before_last_turn"
NO_FINAL_ASSISTANT_TURN = "no_final_assistant_turn"
BAD_ROLES = "bad_roles"
TEMPLATE_REJECTED = "chat_template_rejected"
NOTHING_LEFT = "nothing_left_after_truncation"
BAD_LABEL = "bad_label"  # an unpaired row's label is not true or false
DROP_REASONS = (
    INVALID_JSON,
    NOT_UTF8,
    NOT_AN_OBJECT,
    MALFORMED_ROW,
    ROW_TOO_LARGE,
    MISSING_FIELD,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    DIALOGUES_DIFFER,
    BAD_ROLES,
    NO_FINAL_ASSISTANT_TURN,
    TEMPLATE_REJECTED,
    NOTHING_LEFT,
    BAD_LABEL,
)


class Drop(Exception):
    """A row cannot become a pair; `reason` is the report key, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class DataReport:
    source: str
    format: str
    total: int
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    # The first rows dropped per reason (0-based, as `source_index`), and aligned with them:
    # the 1-based line each starts on (JSON Lines and CSV files only), and what is wrong.
    examples: dict[str, list[int]] = field(default_factory=dict)
    example_lines: dict[str, list[int]] = field(default_factory=dict)
    example_details: dict[str, list[str]] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        """Whether the rows were message lists, rendered with the chat template (pairs or unpaired)."""
        return self.format in ("conversational", "unpaired_conversational")

    def record_drop(self, reason: str, index: int, detail: str = "", line: int | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        first = self.examples.setdefault(reason, [])
        # Drops come from two passes (text, then tokens): keep the smallest indices.
        at = bisect.bisect(first, index)
        if at >= EXAMPLES_PER_REASON:
            return
        columns = [(first, index), (self.example_details.setdefault(reason, []), detail)]
        if line is not None:
            columns.append((self.example_lines.setdefault(reason, []), line))
        for values, value in columns:
            values.insert(at, value)
            del values[EXAMPLES_PER_REASON:]

    def drop_row(self, index: int, problem: Drop, strict: bool, lines: Sequence[int] | None) -> None:
        """Count a row that cannot be kept (`lines`: the 1-based line of each row, when its file
        has lines); with `strict` (data.strict) it is a DataError naming the row instead."""
        line = lines[index] if lines is not None else None
        if strict:
            raise DataError(
                f"{self.source}: {location(index, line)}: {problem.detail} ({problem.reason}; "
                "data.strict=true stops at the first bad row)"
            )
        self.record_drop(problem.reason, index, problem.detail, line)

    def first_problem(self) -> str:
        """Where the first dropped row is and what is wrong with it, for an error message."""
        if not self.examples:
            return ""
        reason = min(self.examples, key=lambda r: self.examples[r][0])
        return f"{self._where(reason, 0)}: {self.example_details[reason][0]}"

    def _where(self, reason: str, at: int) -> str:
        lines = self.example_lines.get(reason)
        return location(self.examples[reason][at], lines[at] if lines else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        n_dropped = sum(self.dropped.values())
        lines = [
            f"{self.source}: {self.format} format, {self.total} rows, "
            f"{self.kept} pairs kept, {n_dropped} dropped"
        ]
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            rows = ", ".join(str(i) for i in self.examples.get(reason, []))
            more = ", ..." if count > EXAMPLES_PER_REASON else ""
            lines.append(f"  dropped {count} {reason} (rows {rows}{more})")
            for at, detail in enumerate(self.example_details.get(reason, [])):
                lines.append(f"    {self._where(reason, at)}: {detail}")
        lines.append(f"  truncated to max_length: {self.truncated} kept pairs")
        if self.lengths:
            parts = [
                f"{name} {int(s['p50'])}/{int(s['p90'])}/{int(s['p99'])}/{int(s['max'])}"
                for name, s in self.lengths.items()
            ]
            lines.append("  tokens p50/p90/p99/max: " + ", ".join(parts))
        return "\n".join(lines)


def location(index: int, line: int | None) -> str:
    return f"line {line} (row {index})" if line is not None else f"row {index}"


def _percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(math.ceil(q / 100 * len(sorted_values)), 1)
    return float(sorted_values[rank - 1])


def length_stats(
    pairs: Sequence[TokenizedPair], responses: tuple[str, str] = ("chosen", "rejected")
) -> dict[str, dict[str, float]]:
    """Token-length percentiles; "pair" is prompt + longer response, what max_length bounds.
    `responses` names the two responses (an unpaired row's: completion, kl_completion)."""
    if not pairs:
        return {}
    columns = {
        "prompt": [len(p.prompt_ids) for p in pairs],
        responses[0]: [len(p.chosen_ids) for p in pairs],
        responses[1]: [len(p.rejected_ids) for p in pairs],
        "pair": [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
    }
    stats = {}
    for name, values in columns.items():
        values.sort()
        stats[name] = {
            "p50": _percentile(values, 50),
            "p90": _percentile(values, 90),
            "p99": _percentile(values, 99),
            "max": float(values[-1]),
        }
    return stats
