"""What the reference makes of the pairs, before any training: in numbers (`cache info`) and in
one figure (`cache info --plot`, cache.png).

- the reference's own margin, per token: log πref(yw|x)/|yw| − log πref(yl|x)/|yl|. Pairs the
  reference already prefers teach DPO less than pairs it gets wrong;
- response lengths, chosen against rejected: DPO's summed log-ratios reward length, so a data
  set whose chosen responses are mostly the longer ones invites the policy to learn "longer"
  instead of "better".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo.fileio import atomic_write

PLOT = "cache.png"


@dataclass(frozen=True)
class PairOverview:
    margins: torch.Tensor  # [N] fp32, per-token chosen minus rejected log-prob
    chosen_tokens: torch.Tensor  # [N]
    rejected_tokens: torch.Tensor  # [N]

    @classmethod
    def of(cls, cache: Any) -> PairOverview:
        """From a ReferenceCache."""
        chosen = cache.chosen_logps / cache.chosen_tokens.clamp(min=1)
        rejected = cache.rejected_logps / cache.rejected_tokens.clamp(min=1)
        return cls(chosen - rejected, cache.chosen_tokens, cache.rejected_tokens)

    def __len__(self) -> int:
        return len(self.margins)

    def share(self, mask: torch.Tensor) -> float:
        return float(mask.float().mean()) if len(mask) else 0.0

    @property
    def chosen_longer(self) -> float:
        return self.share(self.chosen_tokens > self.rejected_tokens)

    @property
    def same_length(self) -> float:
        return self.share(self.chosen_tokens == self.rejected_tokens)

    @property
    def rejected_longer(self) -> float:
        return self.share(self.chosen_tokens < self.rejected_tokens)

    @property
    def prefers_chosen(self) -> float:
        return self.share(self.margins > 0)

    def lines(self) -> list[str]:
        m = self.margins
        return [
            f"reference margin per token (chosen - rejected): mean {m.mean():+.3f}, median {m.median():+.3f}, "
            f"p10 {m.quantile(0.1):+.3f}, p90 {m.quantile(0.9):+.3f}; "
            f"the reference prefers chosen in {self.prefers_chosen:.1%} of {len(self)} pairs",
            f"response tokens: chosen mean {self.chosen_tokens.float().mean():.1f}, "
            f"rejected mean {self.rejected_tokens.float().mean():.1f}",
            f"chosen longer in {self.chosen_longer:.1%} of pairs, same length {self.same_length:.1%}, "
            f"rejected longer {self.rejected_longer:.1%} (the more chosen-longer pairs, the more DPO "
            "can win by length alone)",
        ]


def write_plot(overview: PairOverview, path: Path, title: str) -> Path:
    """cache.png: margin histogram, chosen vs rejected lengths, and which response is longer.

    Uses the Agg canvas directly (no pyplot), as the run report does.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}  ({len(overview)} pairs)")
    margins, axes = overview.margins.numpy(), fig.subplots(1, 3)

    ax = axes[0]
    ax.hist(margins, bins=min(60, max(10, len(margins) // 10)), color="C0")
    ax.axvline(0.0, color="0.4", linestyle="--", linewidth=1, label="no preference")
    ax.axvline(float(margins.mean()), color="C3", linewidth=1.5, label=f"mean {margins.mean():+.3f}")
    ax.set(
        title=f"reference margin: prefers chosen in {overview.prefers_chosen:.1%}",
        xlabel="log πref(yw|x)/|yw| − log πref(yl|x)/|yl|  (nats per token)",
        ylabel="pairs",
    )
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    # Token counts are integers: many pairs share a point, so a point's area is its pair count.
    lengths = torch.stack([overview.rejected_tokens, overview.chosen_tokens], dim=1)  # [N, 2]
    points, counts = lengths.unique(dim=0, return_counts=True)
    rejected, chosen = points[:, 0].numpy(), points[:, 1].numpy()
    ax.scatter(rejected, chosen, s=12 * counts.numpy(), alpha=0.5, color="C0", edgecolors="none")
    top = float(max(chosen.max(), rejected.max())) + 1
    ax.plot([0, top], [0, top], color="0.4", linestyle="--", linewidth=1, label="same length")
    ax.set(
        title="response length (area: pairs)",
        xlabel="rejected tokens",
        ylabel="chosen tokens",
        xlim=(0, top),
        ylim=(0, top),
    )
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    shares = (overview.chosen_longer, overview.same_length, overview.rejected_longer)
    bars = ax.bar(("chosen longer", "same length", "rejected longer"), shares, color=("C3", "0.6", "C0"))
    for bar, share in zip(bars, shares):
        ax.annotate(f"{share:.1%}", (bar.get_x() + bar.get_width() / 2, share), ha="center", va="bottom")
    ax.set(title="which response is longer (DPO can exploit length)", ylabel="share of pairs", ylim=(0, 1.05))

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
