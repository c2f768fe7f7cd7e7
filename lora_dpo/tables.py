"""Markdown tables, for report.md and sweep.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """A float to 4 significant digits, a list comma-separated, anything else as `str`; a
    caller wanting another format passes the text (a string is kept as it is)."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = ", ".join(str(v) for v in value) or "[]"
    else:
        text = str(value)
    return text.replace("|", "\\|")  # a bare | would end the table cell


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The table's lines: header, rule, one line per row."""
    lines = ["| " + " | ".join(format_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in rows]
    return lines
