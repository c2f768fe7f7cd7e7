"""Training metrics: accumulated on the device, synced once per logging step (metrics.jsonl is
written by `lora_dpo.run.metrics_file`)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from lora_dpo.distributed import all_reduce_
from lora_dpo.logps import SequenceLogps
from lora_dpo.losses import DPOOutput

# TRL's names, so dashboards and habits carry over. The rewards are β·(summed log-ratio) for
# every loss type (see `DPOOutput`), so `rewards/*` of any run, train or eval, share one unit.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def tie_aware_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 for a positive margin, 0.5 for a tie, 0 otherwise, so a policy equal to its
    reference scores 0.5 (chance), not 0. Shape: [B] -> [B] float64."""
    return (margins > 0).double() + 0.5 * (margins == 0).double()


def pair_metrics(out: DPOOutput, policy: SequenceLogps) -> torch.Tensor:
    """The PAIR_METRICS of each pair, rows in that order: [M, B] float64, detached. Training
    averages them over a logging window, eval over the held-out pairs."""
    margins = out.chosen_rewards - out.rejected_rewards  # [B]
    return torch.stack(
        [
            out.losses.detach().double(),
            out.chosen_rewards.double(),
            out.rejected_rewards.double(),
            tie_aware_accuracy(margins),
            margins.double(),
            policy.chosen.detach().double(),
            policy.rejected.detach().double(),
        ]
    )  # [M, B]


class WindowMeter:
    """Sums over the pairs and steps since the last log, kept on the device; the one host sync
    happens in `flush`. Steps whose loss or gradient was not finite are counted, not averaged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = zeros(len(PAIR_METRICS))  # over pairs of finite steps
        self.pairs = zeros()
        self.grad_norms = zeros()  # over finite steps
        self.finite_flags: list[torch.Tensor] = []  # one 0-d bool per step of the window
        self.step_pairs: list[list[int]] = []  # source rows of each step's pairs
        self.steps = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add_pairs(self, out: DPOOutput, policy: SequenceLogps, tokens: int) -> torch.Tensor:
        """Stage a micro-batch; returns its 0-d finite flag (on the device)."""
        per_pair = pair_metrics(out, policy)  # [M, B]
        finite = torch.isfinite(per_pair).all()
        self._staged.append((torch.where(finite, per_pair.sum(dim=1), 0.0), per_pair.shape[1], finite))
        self.tokens += tokens
        return finite

    def begin_step(self) -> None:
        self._staged: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def end_step(self, grad_norm: torch.Tensor, finite: torch.Tensor, source_rows: list[int]) -> None:
        """Commit the step's micro-batches when the whole step was finite (no sync)."""
        for sums, pairs, _ in self._staged:
            self.sums += torch.where(finite, sums, 0.0)
            self.pairs += finite.double() * pairs
        self.grad_norms += torch.where(finite, grad_norm.double(), 0.0)
        self.finite_flags.append(finite)
        self.step_pairs.append(source_rows)
        self.steps += 1

    def flush(self) -> tuple[dict[str, float], list[tuple[bool, list[int]]]]:
        """(means over the window, (finite, source rows) of each of its steps); the window's
        one host sync."""
        # Under torchrun: sums over all ranks (steps are skipped alike on every rank).
        totals = torch.cat(
            [
                self.sums,
                self.pairs.view(1),
                torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device),
            ]
        )
        all_reduce_(totals)
        self.sums, self.pairs, self.tokens = totals[:-2], totals[-2], int(totals[-1].item())
        flags = torch.stack(self.finite_flags).tolist() if self.finite_flags else []
        good_steps = sum(flags)
        values = (self.sums / self.pairs.clamp(min=1)).tolist()
        elapsed = time.perf_counter() - self.started
        metrics = dict(zip(PAIR_METRICS, values)) if good_steps else dict.fromkeys(PAIR_METRICS, math.nan)
        metrics["grad_norm"] = self.grad_norms.item() / max(good_steps, 1) if good_steps else math.nan
        metrics["skipped_steps"] = len(flags) - good_steps
        metrics["step_time_s"] = elapsed / max(self.steps, 1)
        metrics["tokens_per_s"] = self.tokens / elapsed if elapsed > 0 else 0.0
        metrics.update(memory_metrics(self.device))
        steps = list(zip(flags, self.step_pairs))
        self.reset()
        return metrics, steps

    def state_dict(self) -> dict[str, Any]:
        """The window so far, for a checkpoint taken between logging steps (syncs once)."""
        return {
            "sums": self.sums.tolist(),
            "pairs": self.pairs.item(),
            "grad_norms": self.grad_norms.item(),
            "finite_flags": [bool(f) for f in self.finite_flags],
            "step_pairs": self.step_pairs,
            "steps": self.steps,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums, self.pairs, self.grad_norms = (
            as_tensor(state[k]) for k in ("sums", "pairs", "grad_norms")
        )
        self.finite_flags = [torch.tensor(f, device=self.device) for f in state["finite_flags"]]
        self.step_pairs = state["step_pairs"]
        self.steps, self.tokens = state["steps"], state["tokens"]


def memory_metrics(device: torch.device) -> dict[str, float]:
    """`peak_memory_mb` (see `peak_memory_mb`); on CUDA also `peak_reserved_mb`, the caching
    allocator's peak hold on the device (max_memory_reserved: the tensors plus its cache of
    freed blocks), and `device_used_mb`, the device's memory in use now by everything
    (mem_get_info: total - free), the only figure that counts the CUDA context, the kernels
    of torch, cuBLAS and bitsandbytes, NCCL's buffers and other processes."""
    peak = peak_memory_mb(device)
    metrics = {} if peak is None else {"peak_memory_mb": peak}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        metrics["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        metrics["device_used_mb"] = (total - free) / 2**20
    return metrics


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak since the process started: CUDA memory allocated by tensors on a GPU, the
    process's peak resident set size on the CPU (None where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def console_line(step: int, total: int, metrics: dict[str, float]) -> str:
    return (
        f"step {step}/{total} | loss {metrics['loss']:.4f} | "
        f"acc {metrics['rewards/accuracies']:.2f} | margin {metrics['rewards/margins']:+.3f} | "
        f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
        f"{metrics['step_time_s']:.2f} s/step | {metrics['tokens_per_s']:.0f} tok/s"
        + (f" | peak {metrics['peak_memory_mb']:.0f} MB" if "peak_memory_mb" in metrics else "")
    )
