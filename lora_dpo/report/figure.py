"""report.png: the training curves of a run against the optimizer step."""

from __future__ import annotations

import math
from typing import Any

from lora_dpo.report.records import RunRecords

GUIDE = "guide"  # gid of reference lines in the plot (ln 2, chance, zero, clip)


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
