"""`lora-dpo sweep`: one reference cache, one training run per β, a table and a plot.

β only scales the log-ratios against the reference, so every run reads the same cache; the
reference model is never run. The data, the cache and the 4-bit base are loaded once; each
run gets fresh LoRA adapters (same seed, so a run equals a standalone `train` with that β).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora_dpo.config import Config
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import atomic_write, write_json, write_text
from lora_dpo.tables import markdown_table
from lora_dpo.train import load_run_inputs, train

log = logging.getLogger(__name__)

COLUMNS = (
    ("beta", "β"),
    ("train_loss", "final train loss"),
    ("eval_reward_accuracy", "eval reward accuracy"),
    ("eval_reward_margin", "eval margin"),
    ("eval_preference_accuracy", "eval preference accuracy"),
    ("eval_chosen_logratio", "chosen log-ratio (eval)"),
)
# With train.reward_model: the policy's held-out completions judged against the reference's.
JUDGE_COLUMNS = (("eval_win_rate", "win rate (eval)"), ("eval_score_gain", "score gain (eval)"))


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    table_md: Path
    table_json: Path
    plot: Path


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--betas {text!r}: expected comma-separated numbers, e.g. 0.01,0.1,0.5") from None
    if not betas or any(b <= 0 for b in betas) or len(set(betas)) != len(betas):
        raise ConfigError(f"--betas {text!r}: need distinct values > 0")
    return betas


def run_dir_name(beta: float) -> str:
    return f"beta-{beta:g}"


def run_sweep(config: Config, betas: Sequence[float]) -> SweepResult:
    """Train once per β under `train.output_dir/beta-<β>`; write sweep.md, sweep.json, sweep.png."""
    if not config.data.eval_path:
        raise ConfigError("sweep compares runs on held-out pairs: set data.eval_path")
    root = Path(config.train.output_dir)
    inputs = load_run_inputs(config)
    rows = []
    for number, beta in enumerate(betas, start=1):
        log.info("sweep run %d/%d: beta=%g", number, len(betas), beta)
        run_config = dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, beta=beta, output_dir=str(root / run_dir_name(beta))),
        )
        result = train(run_config, inputs)
        final = result.eval_after
        assert final is not None  # eval_path is set
        rows.append(
            {
                "beta": beta,
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
        inputs.base = result.policy.unload()  # the frozen base without adapters, for the next β
    table_md, table_json = root / "sweep.md", root / "sweep.json"
    write_text(table_md, sweep_table(rows))
    write_json(table_json, {"runs": rows})
    plot = plot_sweep(rows, root / "sweep.png")
    print(sweep_table(rows))
    log.info("sweep summary: %s, %s, %s", table_md, table_json, plot)
    return SweepResult(rows, table_md, table_json, plot)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """sweep.md: one line per β, every metric to 4 decimals (the judge's columns when judged)."""
    judged = tuple(c for c in JUDGE_COLUMNS if any(row.get(c[0]) is not None for row in rows))
    columns = COLUMNS + judged
    cells = [[f"{row[key]:g}" if key == "beta" else f"{row[key]:.4f}" for key, _ in columns] for row in rows]
    return "\n".join(markdown_table([title for _, title in columns], cells)) + "\n"


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = [row["beta"] for row in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], [("train_loss", "final train loss")], "loss"),
        (axes[0, 1], [("eval_reward_accuracy", "reward accuracy"), ("eval_preference_accuracy", "preference accuracy")], "accuracy (eval)"),
        (axes[1, 0], [("eval_reward_margin", "reward margin")], "margin (eval)"),
        (axes[1, 1], [("eval_chosen_logratio", "mean log πθ(yw|x) − log πref(yw|x)")], "chosen log-ratio (eval, nats)"),
    ]
    for ax, series, ylabel in panels:
        for (key, label), marker in zip(series, ("o", "x")):
            ax.plot(betas, [row[key] for row in rows], marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_xticks(betas, [f"{beta:g}" for beta in betas])
        ax.minorticks_off()
        ax.set_xlabel("β")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend()
    fig.suptitle(f"β sweep on one reference cache ({len(rows)} runs)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
