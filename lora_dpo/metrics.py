"""Training metrics: accumulated on the device, synced once per logging step, written as JSON lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lora_dpo.loss import DPOOutput
from lora_dpo.logps import SequenceLogps

# TRL's names, so dashboards and habits carry over.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class WindowMeter:
    """Sums over the pairs and steps since the last log; `.item()` happens only in `flush`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(PAIR_METRICS), dtype=torch.float64, device=self.device)
        self.grad_norms = torch.zeros((), dtype=torch.float64, device=self.device)
        self.pairs = 0
        self.steps = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add_pairs(self, out: DPOOutput, policy: SequenceLogps, tokens: int) -> None:
        margins = out.chosen_rewards - out.rejected_rewards  # [B]
        accuracies = (margins > 0).double() + 0.5 * (margins == 0).double()  # ties count half
        per_pair = torch.stack(
            [
                out.losses.detach().double(),
                out.chosen_rewards.double(),
                out.rejected_rewards.double(),
                accuracies,
                margins.double(),
                policy.chosen.detach().double(),
                policy.rejected.detach().double(),
            ]
        )  # [M, B]
        self.sums += per_pair.sum(dim=1)
        self.pairs += len(margins)
        self.tokens += tokens

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norms += grad_norm.double()
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Means over the window; one device sync, here and only here."""
        values = (self.sums / max(self.pairs, 1)).tolist()
        elapsed = time.perf_counter() - self.started
        metrics = dict(zip(PAIR_METRICS, values))
        metrics["grad_norm"] = self.grad_norms.item() / max(self.steps, 1)
        metrics["step_time_s"] = elapsed / max(self.steps, 1)
        metrics["tokens_per_s"] = self.tokens / elapsed if elapsed > 0 else 0.0
        self.reset()
        return metrics


class MetricsFile:
    """Appends one JSON object per record to `metrics.jsonl`."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def console_line(step: int, total: int, metrics: dict[str, float]) -> str:
    return (
        f"step {step}/{total} | loss {metrics['loss']:.4f} | "
        f"acc {metrics['rewards/accuracies']:.2f} | margin {metrics['rewards/margins']:+.3f} | "
        f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
        f"{metrics['step_time_s']:.2f} s/step | {metrics['tokens_per_s']:.0f} tok/s"
    )
