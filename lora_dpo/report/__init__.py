"""The run report: `report.png` (training curves) and `report.md` (what ran, on what, how it went).

`write_report(run_dir)` reads only files: `metrics.jsonl`, `config.yaml`, `data_report.json`
in the run directory and the reference cache's `manifest.json` (at `precompute.cache_dir`).
It runs at the end of every `train`, and as `lora-dpo report RUN_DIR`.

The parts: `records` (read metrics.jsonl), `checks` (the health checks), `figure`
(report.png), `markdown` (report.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_dpo.config import TrainConfig
from lora_dpo.errors import LoraDpoError
from lora_dpo.fileio import atomic_write, write_text
from lora_dpo.report.checks import (
    Check,
    check_accuracy_stuck,
    check_chosen_falling,
    check_drift,
    check_finite,
    check_generated_length,
    check_repetition,
    health_checks,
)
from lora_dpo.report.figure import GUIDE, plot_metrics
from lora_dpo.report.markdown import PNG, _cache_lines, render_markdown
from lora_dpo.report.records import RunRecords, read_metrics, run_totals
from lora_dpo.samples import latest, read_samples

log = logging.getLogger(__name__)

MARKDOWN = "report.md"
METRICS = "metrics.jsonl"

__all__ = [
    "GUIDE",
    "Check",
    "ReportResult",
    "RunRecords",
    "check_accuracy_stuck",
    "check_chosen_falling",
    "check_drift",
    "check_finite",
    "check_generated_length",
    "check_repetition",
    "health_checks",
    "plot_metrics",
    "read_metrics",
    "render_markdown",
    "run_totals",
    "write_report",
    "_cache_lines",
]


@dataclass
class ReportResult:
    png: Path
    markdown: Path
    warnings: list[str]  # the fired checks' sentences, also in report.md and on the console
    checks: list[Check] = field(default_factory=list)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        raw = None
    return raw if isinstance(raw, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    return raw if isinstance(raw, dict) else None


def write_report(run_dir: str | Path) -> ReportResult:
    """Write `report.png` and `report.md` into a run directory; returns their paths and the
    health warnings (also logged as warnings)."""
    from lora_dpo.run.directory import RunDirectory

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        raise LoraDpoError(f"{run_dir}: no {METRICS} here; expected a train.output_dir")
    records = read_metrics(metrics_path)
    config = _read_yaml(run_dir / "config.yaml")
    train_cfg = config.get("train") or {}
    beta = float(train_cfg.get("beta", TrainConfig().beta))  # a run directory without config.yaml
    from lora_dpo.losses import REFERENCE_FREE_LOSS_TYPES

    samples_path = RunDirectory(run_dir).samples_jsonl
    samples = latest(read_samples(samples_path)) if samples_path.is_file() else []
    checks = health_checks(records.train, beta, train_cfg.get("loss_type") in REFERENCE_FREE_LOSS_TYPES)
    if samples:
        checks += [check_generated_length(samples), check_repetition(samples)]
    warnings = [c.warning for c in checks if c.warning]

    title = f"{run_dir.resolve().parent.name}/{run_dir.resolve().name}: " + (
        f"{len(warnings)} health warning(s), see report.md" if warnings else "no health warnings"
    )
    figure = plot_metrics(records, title, train_cfg.get("max_grad_norm"))
    png, markdown = run_dir / PNG, run_dir / MARKDOWN
    atomic_write(png, lambda tmp: figure.savefig(tmp, format="png", pil_kwargs={"optimize": True}))
    text = render_markdown(
        run_dir, records, checks, config, _read_json(run_dir / "data_report.json"), samples
    )
    write_text(markdown, text)
    for warning in warnings:
        log.warning("warning: %s", warning)
    log.info("report: %s, %s", markdown, png)
    return ReportResult(png, markdown, warnings, checks)
