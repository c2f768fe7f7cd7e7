"""`lora-dpo sweep`: a grid of `train.*` settings on one reference cache, one training run per
point, a table and a plot.

The loss settings (β, the loss type and its parameters) act on the policy's log-ratios against
the cached reference values, never on the reference itself, so every run reads the same cache
and the reference model never runs. The data, the cache and the 4-bit base are loaded once;
each run gets fresh LoRA adapters (same seed, so a run equals a standalone `train` with its
settings). `--set train.KEY=V1,V2` adds an axis, the grid is the cartesian product (first axis
slowest), and `--betas B1,B2` is `--set train.beta=B1,B2`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo.config import Config, with_overrides
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import atomic_write, write_json, write_text
from lora_dpo.inputs import load_run_inputs
from lora_dpo.tables import markdown_table
from lora_dpo.train import train

log = logging.getLogger(__name__)

# The metrics of each run, after one column per varied setting.
COLUMNS = (
    ("train_loss", "final train loss"),
    ("eval_reward_accuracy", "eval reward accuracy"),
    ("eval_reward_margin", "eval margin"),
    ("eval_preference_accuracy", "eval preference accuracy"),
    ("eval_chosen_logratio", "chosen log-ratio (eval)"),
)
# With train.reward_model: the policy's held-out completions judged against the reference's.
JUDGE_COLUMNS = (("eval_win_rate", "win rate (eval)"), ("eval_score_gain", "score gain (eval)"))
TITLES = {"beta": "β"}
# Settings a grid point cannot vary: the sweep names each run's directory under
# train.output_dir, and every run reads the one cache opened for the sweep.
FIXED_KEYS = ("output_dir", "overwrite_output_dir", "accept_cache_mismatch")


@dataclass(frozen=True)
class SweepAxis:
    """One varied `train.*` setting: its name and its values as written (each parsed and
    checked by the config's own override parser)."""

    key: str  # e.g. "beta", for train.beta
    texts: tuple[str, ...]


@dataclass(frozen=True)
class SweepPoint:
    settings: dict[str, Any]  # varied key -> the config's typed value
    config: Config  # validated, with its own train.output_dir

    @property
    def name(self) -> str:
        return run_dir_name(self.settings)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    table_md: Path
    table_json: Path
    plot: Path


def split_values(text: str) -> list[str]:
    """`a,[1,2],b` -> ["a", "[1,2]", "b"]: commas inside brackets or quotes belong to a value."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_set(text: str) -> SweepAxis:
    """`train.loss_type=sigmoid,ipo` -> SweepAxis("loss_type", ("sigmoid", "ipo"))."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"--set {text!r}: expected train.KEY=V1,V2,..., e.g. train.beta=0.05,0.1")
    section, _, key = dotted.partition(".")
    if section != "train" or not key:
        raise ConfigError(
            f"--set {dotted}: a sweep varies train.* settings (one cache and one base load serve every run)"
        )
    if key in FIXED_KEYS:
        raise ConfigError(
            f"--set {dotted}: the sweep sets this itself (one run directory per point, one cache)"
        )
    values = split_values(raw)
    if any(not v for v in values):
        raise ConfigError(f"--set {text!r}: an empty value; separate values with single commas")
    if len(set(values)) != len(values):
        raise ConfigError(f"--set {text!r}: a value is listed twice")
    return SweepAxis(key, tuple(values))


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--betas {text!r}: expected comma-separated numbers, e.g. 0.01,0.1,0.5") from None
    if not betas or any(b <= 0 for b in betas) or len(set(betas)) != len(betas):
        raise ConfigError(f"--betas {text!r}: need distinct values > 0")
    return betas


def sweep_axes(sets: Sequence[str] = (), betas: str | None = None) -> list[SweepAxis]:
    """The CLI's `--set` flags and `--betas` (shorthand for `--set train.beta=...`) as axes."""
    axes = [parse_set(text) for text in sets]
    if betas is not None:
        axes.append(SweepAxis("beta", tuple(f"{b!r}" for b in parse_betas(betas))))
    keys = [axis.key for axis in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"sweep: train.{repeated[0]} is varied twice (--betas is --set train.beta)")
    if not axes:
        raise ConfigError("sweep: nothing to vary; give --set train.KEY=V1,V2 (or --betas)")
    return axes


def format_value(value: Any) -> str:
    """A setting's value as the table and the run directory names show it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return "none" if value is None else str(value)


def run_dir_name(settings: dict[str, Any]) -> str:
    """`{"loss_type": "ipo", "beta": 0.05}` -> `loss_type-ipo_beta-0.05`."""
    name = "_".join(f"{key}-{format_value(value)}" for key, value in settings.items())
    return re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def grid_points(config: Config, axes: Sequence[SweepAxis]) -> list[SweepPoint]:
    """Every point of the grid, parsed and validated before any model work."""
    root = Path(config.train.output_dir)
    points = []
    for texts in itertools.product(*(axis.texts for axis in axes)):
        label = ", ".join(f"train.{axis.key}={text}" for axis, text in zip(axes, texts))
        try:
            point = with_overrides(
                config, [f"train.{a.key}={t}" for a, t in zip(axes, texts)], origin="--set"
            )
        except ConfigError as exc:
            raise ConfigError(f"sweep point {label}: {exc}") from None
        settings = {axis.key: getattr(point.train, axis.key) for axis in axes}
        point.train.output_dir = str(root / run_dir_name(settings))
        points.append(SweepPoint(settings, point))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"sweep: two grid points are the same run ({clashes[0]}); list each value once")
    return points


def run_sweep(config: Config, axes: Sequence[SweepAxis] | Sequence[float]) -> SweepResult:
    """Train once per grid point under `train.output_dir/<varied keys>`; write sweep.md,
    sweep.json and sweep.png there. A list of numbers is a β sweep (`--betas`)."""
    from lora_dpo.losses import LossSettings

    if not config.data.eval_path:
        raise ConfigError("sweep compares runs on held-out pairs: set data.eval_path")
    grid = [axis for axis in axes if isinstance(axis, SweepAxis)]
    if len(grid) != len(axes):  # a plain list of numbers: a β sweep
        grid = [
            SweepAxis("beta", tuple(repr(float(beta)) for beta in axes if not isinstance(beta, SweepAxis)))
        ]
    points = grid_points(config, grid)
    keys = [axis.key for axis in grid]
    root = Path(config.train.output_dir)
    inputs = load_run_inputs(config, [LossSettings.of(point.config.train) for point in points])
    rows = []
    for number, point in enumerate(points, start=1):
        log.info("sweep run %d/%d: %s", number, len(points), point.name)
        result = train(point.config, inputs)
        final = result.eval_after
        assert final is not None  # eval_path is set
        rows.append(
            {
                **point.settings,
                "train_loss": result.history[-1]["loss"],
                "eval_reward_accuracy": final.reward_accuracy,
                "eval_reward_margin": final.reward_margin,
                "eval_preference_accuracy": final.preference_accuracy,
                "eval_chosen_logratio": final.chosen_logratio,
                "eval_win_rate": final.win_rate,
                "eval_score_gain": final.score_gain,
                "run_dir": str(result.output_dir),
            }
        )
        inputs.base = result.policy.unload()  # the frozen base without adapters, for the next run
        release_run(inputs.device)
    table_md, table_json = root / "sweep.md", root / "sweep.json"
    table = sweep_table(rows, keys)
    write_text(table_md, table)
    write_json(table_json, {"varied": keys, "runs": rows})
    plot = plot_sweep(rows, keys, root / "sweep.png")
    print(table)
    log.info("sweep summary: %s, %s, %s", table_md, table_json, plot)
    return SweepResult(rows, table_md, table_json, plot)


def release_run(device: torch.device) -> None:
    """Free a finished run's optimizer before the next run allocates its own: `train` drops its
    state, but the object sits in reference cycles among the run's objects, which only the
    cyclic collector frees, at a time of its choosing. Then CUDA's cached blocks go back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_table(rows: list[dict[str, Any]], keys: Sequence[str] = ("beta",)) -> str:
    """sweep.md: one line per run, a column per varied setting, every metric to 4 decimals
    (n/a where a run has none: the chosen log-ratio of a reference-free objective), and the
    judge's columns when judged."""
    judged = tuple(c for c in JUDGE_COLUMNS if any(row.get(c[0]) is not None for row in rows))
    columns = COLUMNS + judged
    titles = [TITLES.get(key, key) for key in keys] + [title for _, title in columns]
    cells = [
        [format_value(row[key]) for key in keys]
        + ["n/a" if row.get(key) is None else f"{row[key]:.4f}" for key, _ in columns]
        for row in rows
    ]
    return "\n".join(markdown_table(titles, cells)) + "\n"


def plot_sweep(rows: list[dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    """Four panels of metrics against one varied setting (β if varied, else the first numeric
    one, else the first), one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [
        k for k in keys if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)
    ]
    x_key = "beta" if "beta" in keys else (numeric[0] if numeric else keys[0])
    others = [k for k in keys if k != x_key]
    x_values = list(dict.fromkeys(format_value(r[x_key]) for r in rows))  # in grid order
    positions: dict[str, float] = {text: float(i) for i, text in enumerate(x_values)}
    numbers = x_key in numeric
    if numbers:
        positions = {format_value(r[x_key]): float(r[x_key]) for r in rows}
    log_x = (
        numbers and min(positions.values()) > 0 and max(positions.values()) >= 10 * min(positions.values())
    )
    lines: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault(tuple(format_value(row[k]) for k in others), []).append(row)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = [
        (axes[0, 0], [("train_loss", "")], "final train loss"),
        (
            axes[0, 1],
            [("eval_reward_accuracy", "reward"), ("eval_preference_accuracy", "preference")],
            "accuracy (eval)",
        ),
        (axes[1, 0], [("eval_reward_margin", "")], "reward margin (eval)"),
        (axes[1, 1], [("eval_chosen_logratio", "")], "mean log πθ(yw|x) − log πref(yw|x) (eval, nats)"),
    ]
    for ax, series, ylabel in panels:
        for number, (combination, line_rows) in enumerate(lines.items()):
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combination))
            for (key, what), style in zip(series, ("-o", "--x")):
                xs = [positions[format_value(r[x_key])] for r in line_rows]
                ys = [math.nan if r[key] is None else r[key] for r in line_rows]
                name = " ".join(part for part in (what, label) if part)
                ax.plot(xs, ys, style, color=f"C{number % 10}", label=name or None)
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(list(positions.values()), list(positions))
        ax.minorticks_off()
        ax.set_xlabel(TITLES.get(x_key, x_key))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1 or len(series) > 1:
            ax.legend(fontsize="small")
    varied = ", ".join(TITLES.get(k, k) for k in keys)
    fig.suptitle(f"sweep over {varied} on one reference cache ({len(rows)} runs)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
