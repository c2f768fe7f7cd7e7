"""report.md: what ran, on what, how it went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_dpo.report.checks import Check
from lora_dpo.report.records import RunRecords, run_totals
from lora_dpo.samples import SAMPLES_JSONL, SAMPLES_MD, Sample, samples_markdown
from lora_dpo.tables import markdown_table

SAMPLE_ROWS = 5  # prompts shown in report.md's Samples section
PNG = "report.png"


def _summary_lines(records: RunRecords, run_dir: Path) -> list[str]:
    totals = run_totals(records.train)
    rows = [("optimizer steps", int(records.train[-1]["step"]) if records.train else 0)]
    if records.wall_s is not None:
        resumed = f", {records.sessions} sessions (resumed)" if records.sessions > 1 else ""
        rows.append(("wall time", f"{records.wall_s:.1f} s (train start to the last record{resumed})"))
    skipped = sum(int(r.get("skipped_steps", 0)) for r in records.train)
    if skipped:
        rows.append(("skipped steps", f"{skipped} (non-finite loss or gradient)"))
    if "train_loop_s" in totals:
        rows.append(("time in optimizer steps", f"{totals['train_loop_s']:.1f} s"))
    if "tokens_per_s" in totals:
        rows.append(
            ("throughput", f"{totals['tokens_per_s']:,.0f} tokens/s (prompt + both responses, no padding)")
        )
    if "peak_memory_mb" in totals:
        rows.append(
            (
                "peak memory",
                f"{totals['peak_memory_mb']:,.0f} MB (CUDA: max allocated; CPU: process peak RSS)",
            )
        )
    from lora_dpo.run.directory import RunDirectory

    run, problem = RunDirectory(run_dir), RunDirectory(run_dir).adapter_problem()
    saved = (
        "not saved (the run did not finish?)" if not run.adapter_dir.exists() else f"incomplete: {problem}"
    )
    rows.append(("adapter", "adapter/ (PEFT format)" if problem is None else saved))
    return ["## Summary", "", *markdown_table(("", ""), rows)]


def _final_metrics_lines(records: RunRecords) -> list[str]:
    lines = ["## Final metrics", ""]
    if records.train:
        last = records.train[-1]
        lines.append(f"Training, step {int(last['step'])} (mean over the last logging window):")
        lines.append("")
        lines += markdown_table(("metric", "value"), [(k, v) for k, v in last.items() if k != "step"])
        lines.append("")
    if records.evals:
        first, last = records.evals[0], records.evals[-1]
        names = [k for k in last if k.startswith("eval/")]
        lines.append(f"Held-out pairs, step {int(first['step'])} -> step {int(last['step'])}:")
        lines.append("")
        lines += markdown_table(
            ("metric", f"step {int(first['step'])}", f"step {int(last['step'])}"),
            [(k, first.get(k, "-"), last[k]) for k in names],
        )
        lines.append("")
    if not records.train and not records.evals:
        lines += ["No records yet.", ""]
    return lines


CONFIG_SUMMARY = (
    "model.name_or_path",
    "model.quantization",
    "model.dtype",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "data.train_path",
    "data.eval_path",
    "data.max_length",
    "data.max_prompt_length",
    "train.beta",
    "train.learning_rate",
    "train.per_device_batch_size",
    "train.gradient_accumulation_steps",
    "train.epochs",
    "train.max_steps",
    "train.optimizer",
    "train.warmup_ratio",
    "train.max_grad_norm",
    "train.gradient_checkpointing",
    "train.seed",
    "precompute.cache_dir",
    "precompute.reference",
)


def _config_lines(config: dict[str, Any]) -> list[str]:
    if not config:
        return ["## Config", "", "No config.yaml in the run directory.", ""]
    rows = []
    for dotted in CONFIG_SUMMARY:
        section, key = dotted.split(".")
        if key in (config.get(section) or {}):
            rows.append((f"`{dotted}`", config[section][key]))
    return [
        "## Config",
        "",
        "The full resolved config is in config.yaml.",
        "",
        *markdown_table(("key", "value"), rows),
        "",
    ]


def _cache_lines(config: dict[str, Any]) -> list[str]:
    from lora_dpo.cache import MANIFEST, Manifest, manifest_rows
    from lora_dpo.errors import CacheError
    from lora_dpo.losses import REFERENCE_FREE_LOSS_TYPES

    cache_dir = (config.get("precompute") or {}).get("cache_dir")
    lines = ["## Reference cache", ""]
    loss_type = (config.get("train") or {}).get("loss_type")
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        return lines + [f"None read: train.loss_type={loss_type} is reference-free.", ""]
    if not cache_dir:
        return lines + ["No precompute.cache_dir in config.yaml.", ""]
    if not (Path(cache_dir) / MANIFEST).is_file():
        return lines + [
            f"No manifest at `{cache_dir}` (relative paths are read from the current directory).",
            "",
        ]
    try:
        manifest = Manifest.read(Path(cache_dir))
    except CacheError as exc:  # the report still gets written; the cache is described as it is
        return lines + [f"The manifest cannot be read: {exc}", ""]
    return lines + markdown_table(("", ""), [("path", cache_dir), *manifest_rows(manifest)]) + [""]


def _data_lines(report: dict[str, Any] | None) -> list[str]:
    lines = ["## Training data", ""]
    if report is None:
        return lines + ["No data_report.json in the run directory.", ""]
    dropped = report.get("dropped", {})
    rows = [
        ("source", report.get("source")),
        ("format", report.get("format")),
        ("rows read", report.get("total")),
        ("pairs kept", report.get("kept")),
        ("dropped", ", ".join(f"{reason} {n}" for reason, n in dropped.items()) or "none"),
        ("truncated to max_length", report.get("truncated")),
    ]
    lines += markdown_table(("", ""), rows) + [""]
    lengths = report.get("lengths") or {}
    if lengths:
        lines += ["Tokens per pair part:", ""]
        stats = ("p50", "p90", "p99", "max")
        lines += markdown_table(
            ("", *stats), [(part, *(int(s.get(k, 0)) for k in stats)) for part, s in lengths.items()]
        )
        lines.append("")
    return lines


def _health_lines(checks: Sequence[Check]) -> list[str]:
    fired = [c for c in checks if c.warning]
    lines = ["## Health checks", ""]
    lines.append(f"**{len(fired)} warning(s).**" if fired else "No warnings.")
    lines.append("")
    lines += [f"- **WARNING**: {c.warning}" for c in fired]
    if fired:
        lines.append("")
    lines += markdown_table(
        ("check", "result", "measured"),
        [(c.name, "WARNING" if c.warning else "ok", c.detail) for c in checks],
    )
    return lines + ["", "How each check is defined: `lora_dpo/report.py` and the README."]


def _samples_lines(samples: Sequence[Sample]) -> list[str]:
    if not samples:
        return []
    shown = min(SAMPLE_ROWS, len(samples))
    lines = [
        "## Samples",
        "",
        f"Greedy completions of the first {shown} held-out prompts, reference "
        f"(adapter disabled) and policy; every prompt and step is in {SAMPLES_JSONL} and {SAMPLES_MD}.",
        "",
    ]
    return lines + samples_markdown(samples, limit=SAMPLE_ROWS)


def render_markdown(
    run_dir: Path,
    records: RunRecords,
    checks: Sequence[Check],
    config: dict[str, Any],
    data_report: dict[str, Any] | None,
    samples: Sequence[Sample] = (),
) -> str:
    name = f"{run_dir.resolve().parent.name}/{run_dir.resolve().name}"
    lines = [f"# Run report: {name}", "", f"Run directory: `{run_dir}`", ""]
    lines += _health_lines(checks) + [""]
    lines += [f"![training curves]({PNG})", ""]
    lines += _summary_lines(records, run_dir) + [""]
    lines += _final_metrics_lines(records)
    lines += _samples_lines(samples)
    lines += _config_lines(config)
    lines += _cache_lines(config)
    lines += _data_lines(data_report)
    if records.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in records.notes], ""]
    return "\n".join(lines).rstrip() + "\n"
