"""The run report: `report.png` (training curves) and `report.md` (what ran, on what, how it went).

`write_report(run_dir)` reads only files: `metrics.jsonl`, `config.yaml`, `data_report.json`
in the run directory and the reference cache's `manifest.json` (at `precompute.cache_dir`).
It runs at the end of every `train`, and as `lora-dpo report RUN_DIR`.

Health checks over the training records (β from config.yaml). They read the rewards, not
the raw `logps/*`: a record's `logps/chosen` is a mean over whichever pairs fell into its
logging window, so it moves with their lengths, while `rewards/chosen / β` is each pair's
change against its own cached reference value, averaged: the drift of the chosen
log-likelihood in nats, free of batch composition. The rewards are β·(summed log-ratio) for
every loss type (IPO's per-token normalisation stays inside its loss), so the thresholds below
mean the same nats whatever `train.loss_type` is.

- **chosen log-probs falling while margins rise** (the classic DPO failure: the margin grows
  by pushing both responses down). Needs >= 4 training records; fires when the least-squares
  slope of `rewards/chosen` over steps is negative, the last two records are both at most
  -1 nat (`rewards/chosen / β <= -1`: chosen responses at least e times less likely than
  under the reference, and not for one noisy window only), and the least-squares slope of
  `rewards/margins` is positive.
- **drift from the reference**: the mean absolute summed log-ratio against the reference,
  `(|rewards/chosen| + |rewards/rejected|) / (2β)` nats, relative to the reference's own mean
  |log-prob| of the same responses, `(|logps/chosen - rewards/chosen/β| + |logps/rejected -
  rewards/rejected/β|) / 2`. Fires when the last record's ratio is >= 0.5: the policy's
  summed log-probs have moved by half their own size. (Not a KL estimate: the KL would need
  samples from the policy; this is a drift on the training responses.)
- **reward accuracy stuck at chance**: needs >= 4 training records; fires when the mean of
  `rewards/accuracies` over the last half is within 0.5 +- 0.05 (a policy equal to its
  reference scores exactly 0.5: ties count half).
- **non-finite values**: any NaN or infinite training metric, or any optimizer step skipped
  for a non-finite loss or gradient (`skipped_steps`).

Checks over what the policy writes, on the samples of the latest step in `samples.jsonl`
(written with `train.generate_every` or `lora-dpo generate`; a run without one has neither):

- **generated length**: mean generated tokens of the policy over the reference's, on the same
  held-out prompts. Fires when the ratio is outside [0.5, 2]: the policy writes less than half
  or more than twice as much as its reference (rambling, or answers cut to nothing).
- **repetition**: the share of the policy's word 4-grams that repeat an earlier 4-gram of the
  same completion. Fires when it is above 0.3 (looping text); the reference's share is shown
  beside it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_dpo.errors import LoraDpoError
from lora_dpo.fileio import atomic_write, write_text
from lora_dpo.samples import (
    SAMPLES_JSONL,
    SAMPLES_MD,
    Sample,
    latest,
    read_samples,
    repeated_ngram_share,
    samples_markdown,
)
from lora_dpo.tables import markdown_table

log = logging.getLogger(__name__)

PNG = "report.png"
MARKDOWN = "report.md"
METRICS = "metrics.jsonl"

MIN_TREND_RECORDS = 4  # fewer logged steps than this cannot show a trend
CHOSEN_DROP_NATS = 1.0  # chosen responses e times less likely than under the reference
DRIFT_RATIO_LIMIT = 0.5  # policy log-probs moved by half the reference's own |log-prob|
CHANCE_BAND = 0.05  # accuracy within 0.5 +- this is chance
LENGTH_RATIO_BAND = (0.5, 2.0)  # policy / reference mean generated length
REPEAT_NGRAM, REPEAT_LIMIT = 4, 0.3  # share of word 4-grams repeating an earlier one
SAMPLE_ROWS = 5  # prompts shown in report.md's Samples section
DEFAULT_BETA = 0.1  # TrainConfig's default, for a run directory without config.yaml
GUIDE = "guide"  # gid of reference lines in the plot (ln 2, chance, zero, clip)


@dataclass
class Check:
    """One health check: `warning` is a sentence when it fired, None when the run looks fine."""

    name: str
    detail: str  # what was measured, shown whether or not it fired
    warning: str | None = None


@dataclass
class ReportResult:
    png: Path
    markdown: Path
    warnings: list[str]  # the fired checks' sentences, also in report.md and on the console
    checks: list[Check] = field(default_factory=list)


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


# ----------------------------------------------------------------------------- health checks


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def _series(records: Sequence[dict[str, float]], name: str) -> list[float]:
    return [float(r[name]) for r in records if name in r]


def _finite(record: dict[str, float], *names: str) -> bool:
    """Whether the record has every name with a finite value (a window of skipped steps has NaN)."""
    return all(isinstance(record.get(n), (int, float)) and math.isfinite(record[n]) for n in names)


def check_chosen_falling(train: Sequence[dict[str, float]], beta: float) -> Check:
    name = "chosen log-probs vs margins"
    records = [r for r in train if _finite(r, "rewards/chosen", "rewards/margins")]
    if len(records) < MIN_TREND_RECORDS:
        return Check(name, f"not judged: {len(records)} training records, trends need {MIN_TREND_RECORDS}")
    steps = _series(records, "step")
    drift = [r["rewards/chosen"] / beta for r in records]  # nats vs the reference
    margins = _series(records, "rewards/margins")
    detail = (
        f"chosen log-prob drift {drift[0]:+.2f} -> {drift[-1]:+.2f} nats vs the reference, "
        f"margins {margins[0]:+.3f} -> {margins[-1]:+.3f}"
    )
    falling = _slope(steps, drift) < 0 and max(drift[-2:]) <= -CHOSEN_DROP_NATS
    if falling and _slope(steps, margins) > 0:
        return Check(
            name,
            detail,
            f"chosen log-probs falling while margins rise: at step {int(steps[-1])} chosen responses "
            f"are {-drift[-1]:.2f} nats less likely than under the reference (rewards/chosen "
            f"{records[-1]['rewards/chosen']:+.3f} at beta {beta:g}) while rewards/margins rose "
            f"{margins[0]:+.3f} -> {margins[-1]:+.3f}: the margin grows by pushing both responses "
            "down, the classic DPO failure. Try a lower learning rate or a larger beta, an NLL term "
            "on the chosen responses (train.rpo_alpha > 0), and check that the chosen responses are "
            "likely under the base model (SFT on them first).",
        )
    return Check(name, detail)


def check_drift(train: Sequence[dict[str, float]], beta: float) -> Check:
    name = "drift from the reference"
    keys = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    records = [r for r in train if _finite(r, *keys)]
    if not records:
        return Check(name, "not judged: no training records with rewards and log-probs")
    last = records[-1]
    drift = (abs(last["rewards/chosen"]) + abs(last["rewards/rejected"])) / (2 * beta)
    reference = (
        abs(last["logps/chosen"] - last["rewards/chosen"] / beta)
        + abs(last["logps/rejected"] - last["rewards/rejected"] / beta)
    ) / 2
    ratio = drift / reference if reference > 0 else math.inf
    detail = (
        f"mean |log-prob drift| {drift:.2f} nats = {ratio:.1%} of the reference's own "
        f"|log-prob| ({reference:.1f} nats) at step {int(last['step'])}"
    )
    if ratio >= DRIFT_RATIO_LIMIT:
        return Check(
            name,
            detail,
            f"policy drifting far from the reference: at step {int(last['step'])} its summed log-probs "
            f"have moved {drift:.1f} nats from the reference on average, {ratio:.0%} of the reference's "
            f"own {reference:.1f}: the policy has left the reference far behind (degenerate text "
            "is likely). Try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def check_accuracy_stuck(train: Sequence[dict[str, float]]) -> Check:
    name = "reward accuracy"
    records = [r for r in train if _finite(r, "rewards/accuracies")]
    if len(records) < MIN_TREND_RECORDS:
        return Check(name, f"not judged: {len(records)} training records, trends need {MIN_TREND_RECORDS}")
    half = records[len(records) // 2 :]
    mean = sum(r["rewards/accuracies"] for r in half) / len(half)
    span = f"steps {int(half[0]['step'])}-{int(half[-1]['step'])}"
    detail = f"mean {mean:.3f} over the last {len(half)} training records ({span})"
    if abs(mean - 0.5) <= CHANCE_BAND:
        return Check(
            name,
            detail,
            f"reward accuracy stuck at chance: mean {mean:.3f} over the last {len(half)} logging "
            f"steps ({span}). The policy is not separating chosen from rejected: check the "
            "learning rate (lr panel), that gradients flow (grad_norm panel), and that chosen and "
            "rejected are not swapped or identical.",
        )
    return Check(name, detail)


def check_finite(train: Sequence[dict[str, float]]) -> Check:
    name = "finite values"

    def non_finite(r: dict[str, float]) -> list[str]:
        return [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]

    bad = sorted({k for r in train for k in non_finite(r)})
    skipped = [(int(r["step"]), int(r["skipped_steps"])) for r in train if r.get("skipped_steps")]
    total_skipped = sum(n for _, n in skipped)
    detail = f"non-finite: {', '.join(bad)}" if bad else f"all {len(train)} training records finite"
    detail += f"; {total_skipped} step(s) skipped" if skipped else ""
    if bad:
        first = next(int(r["step"]) for r in train if non_finite(r))
        return Check(
            name,
            detail,
            f"non-finite training metrics from step {first} on ({', '.join(bad)}): the run diverged. "
            "Try a lower learning rate or a smaller train.max_grad_norm.",
        )
    if skipped:
        return Check(
            name,
            detail,
            f"{total_skipped} optimizer step(s) skipped for a non-finite loss or gradient, the first "
            f"in the logging window ending at step {skipped[0][0]}: the run is close to diverging. "
            "Try a lower learning rate or a smaller train.max_grad_norm.",
        )
    return Check(name, detail)


def check_generated_length(samples: Sequence[Sample]) -> Check:
    name = "generated length"
    if not samples:
        return Check(name, "not judged: no samples")
    policy = sum(s.policy_tokens for s in samples) / len(samples)
    reference = sum(s.reference_tokens for s in samples) / len(samples)
    ratio = policy / reference if reference > 0 else math.inf
    low, high = LENGTH_RATIO_BAND
    step = samples[0].step
    detail = (
        f"mean {policy:.1f} tokens (policy) vs {reference:.1f} (reference), ratio {ratio:.2f}, "
        f"{len(samples)} held-out prompts at step {step}"
    )
    if not low <= ratio <= high:
        return Check(
            name,
            detail,
            f"generated length far from the reference's: at step {step} the policy writes {policy:.1f} "
            f"tokens on average where the reference writes {reference:.1f} (ratio {ratio:.2f}, outside "
            f"[{low:g}, {high:g}]): look at samples.md. Rambling or truncated answers often mean the "
            "policy has drifted too far; try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def check_repetition(samples: Sequence[Sample]) -> Check:
    name = "repetition"
    if not samples:
        return Check(name, "not judged: no samples")
    policy = repeated_ngram_share([s.policy for s in samples], REPEAT_NGRAM)
    reference = repeated_ngram_share([s.reference for s in samples], REPEAT_NGRAM)
    step = samples[0].step
    detail = f"repeated word {REPEAT_NGRAM}-grams {policy:.1%} (policy) vs {reference:.1%} (reference) at step {step}"
    if policy > REPEAT_LIMIT:
        return Check(
            name,
            detail,
            f"degenerate repetition: at step {step} {policy:.0%} of the policy's word {REPEAT_NGRAM}-grams "
            f"repeat an earlier one in the same completion (the reference: {reference:.0%}): look at "
            "samples.md. Try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def health_checks(
    train: Sequence[dict[str, float]], beta: float, reference_free: bool = False
) -> list[Check]:
    """`reference_free`: the objective (simpo, orpo, cpo) logs its own rewards, not log-ratios
    against a reference, so the two checks that read them as nats of drift do not apply."""
    if reference_free:
        unjudged = "not judged: a reference-free objective's rewards are not log-ratios against a reference"
        reference_checks = [
            Check("chosen log-probs vs margins", unjudged),
            Check("drift from the reference", unjudged),
        ]
    else:
        reference_checks = [check_chosen_falling(train, beta), check_drift(train, beta)]
    return [
        *reference_checks,
        check_accuracy_stuck(train),
        check_finite(train),
    ]


# ----------------------------------------------------------------------------- the figure


def plot_metrics(records: RunRecords, title: str, max_grad_norm: float | None = None) -> Any:
    """A 2 x 3 grid of training curves against the optimizer step; returns a matplotlib Figure.

    Uses the Agg canvas directly (no pyplot): no display needed, and a caller's own
    matplotlib backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7.2), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    train, evals = records.train, records.evals

    def curve(ax, rows, name: str, label: str, **style) -> None:
        points = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
        if points:
            xs, ys = zip(*points)
            style.setdefault("marker", "o" if len(points) <= 40 else None)
            ax.plot(xs, ys, label=label, markersize=3, **style)

    def guide(ax, y: float, label: str) -> None:
        ax.axhline(y, color="0.6", linestyle="--", linewidth=1, label=label, gid=GUIDE)

    ax = axes[0, 0]
    curve(ax, train, "loss", "train")
    guide(ax, math.log(2), "ln 2 (policy = reference)")
    ax.set(title="DPO loss", ylabel="loss")

    ax = axes[0, 1]
    curve(ax, train, "rewards/accuracies", "train")
    curve(ax, evals, "eval/rewards/accuracies", "eval", linestyle="--", marker="s")
    guide(ax, 0.5, "chance")
    ax.set(title="reward accuracy", ylabel="share of pairs, chosen reward > rejected", ylim=(-0.03, 1.03))

    ax = axes[0, 2]
    curve(ax, train, "rewards/margins", "margin (train)", color="C0")
    curve(ax, evals, "eval/rewards/margins", "margin (eval)", color="C0", linestyle="--", marker="s")
    curve(ax, train, "rewards/chosen", "chosen", color="C2", linewidth=1)
    curve(ax, train, "rewards/rejected", "rejected", color="C3", linewidth=1)
    guide(ax, 0.0, "reference")
    ax.set(title="implicit rewards", ylabel="β · (log π − log π_ref), summed over the response")

    ax = axes[1, 0]
    curve(ax, train, "logps/chosen", "chosen", color="C2")
    curve(ax, train, "logps/rejected", "rejected", color="C3")
    ax.set(title="policy log-probs (mean over each window's pairs)", ylabel="summed response log-prob (nats)")

    ax = axes[1, 1]
    curve(ax, train, "lr", "lr")
    ax.set(title="learning rate", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    ax = axes[1, 2]
    curve(ax, train, "grad_norm", "grad norm")
    if max_grad_norm:
        guide(ax, max_grad_norm, f"clip at {max_grad_norm:g}")
    ax.set(title="gradient norm (before clipping)", ylabel="global L2 norm")

    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        data = [line for line in ax.get_lines() if line.get_gid() != GUIDE]
        if not data:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.5")
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- the report


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
    beta = float(train_cfg.get("beta", DEFAULT_BETA))
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
