"""metrics.jsonl read back for a report: training and eval records, what could not be read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_dpo.errors import LoraDpoError


@dataclass
class RunRecords:
    train: list[dict[str, float]]  # records with `loss`, by step
    evals: list[dict[str, float]]  # records with `eval/...` keys, by step
    notes: list[str] = field(default_factory=list)  # lines that could not be read
    wall_s: float | None = None  # summed over sessions (a resumed run restarts `elapsed_s`)
    sessions: int = 1


def read_metrics(path: Path) -> RunRecords:
    train, evals, notes = [], [], []
    session_ends: list[float] = []  # the last `elapsed_s` of each session, in file order
    # Damaged bytes become U+FFFD, so such a line fails as JSON below instead of the whole file.
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {number} is not JSON (an interrupted write?); skipped")
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            notes.append(f"{path.name} line {number} is not a record with a numeric step; skipped")
            continue
        damaged = sorted(key for key, value in record.items() if not _is_number(value))
        if damaged:  # every value train writes is a number: the health checks do arithmetic on them
            notes.append(f"{path.name} line {number}: non-numeric {', '.join(damaged)}; those values skipped")
            record = {key: value for key, value in record.items() if key not in damaged}
        if "loss" in record:
            train.append(record)
        if any(key.startswith("eval/") for key in record):
            evals.append(record)
        if "elapsed_s" in record:
            if session_ends and record["elapsed_s"] >= session_ends[-1]:
                session_ends[-1] = record["elapsed_s"]
            else:  # the first record, or a resumed run's clock starting again
                session_ends.append(record["elapsed_s"])
    if notes and not train and not evals:
        first = notes[0].removeprefix(f"{path.name} ").rsplit("; ", 1)[0]
        raise LoraDpoError(
            f"{path}: no readable metrics record in {len(notes)} damaged line(s); the first: {first}"
        )
    train.sort(key=lambda r: r["step"])
    evals.sort(key=lambda r: r["step"])
    wall = sum(session_ends) if session_ends else None
    return RunRecords(train, evals, notes, wall, max(len(session_ends), 1))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_totals(train: Sequence[dict[str, float]]) -> dict[str, float]:
    """Overall tokens/s, time in optimizer steps and peak memory from the training records.

    Each training record covers the steps since the one before; its tokens are
    tokens_per_s x step_time_s x steps, so the overall rate weighs every window by its length.
    """
    totals: dict[str, float] = {}
    tokens = seconds = 0.0
    previous = 0
    for r in train:
        steps = r["step"] - previous
        previous = r["step"]
        if "tokens_per_s" in r and "step_time_s" in r:
            window = r["step_time_s"] * steps
            tokens += r["tokens_per_s"] * window
            seconds += window
    if seconds > 0:
        totals["tokens_per_s"] = tokens / seconds
        totals["train_loop_s"] = seconds
    peaks = [r["peak_memory_mb"] for r in train if "peak_memory_mb" in r]
    if peaks:
        totals["peak_memory_mb"] = max(peaks)
    return totals
