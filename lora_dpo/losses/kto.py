"""`kto`: Kahneman-Tversky optimisation, on unpaired rows (a completion labelled desirable or not).

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv:2402.01306), Eq. 7, as TRL's KTOTrainer computes it. Each row is a prompt x, a
completion y with its label, and a mismatched KL completion y' (another row's completion, see
lora_dpo.data.unpaired). With Δ = log πθ(y|x) - log πref(y|x) and Δ' the same for y':

    z0 = max(0, mean over the batch of Δ')                 (detached: the reference point)
    L  = λD·(1 - σ(β·(Δ - z0)))   for a desirable row
         λU·(1 - σ(β·(z0 - Δ)))   for an undesirable one

λD, λU are TRL's `desirable_weight` and `undesirable_weight`; the batch loss is the mean of the
rows' L (TRL's `losses.nanmean()`). TRL averages z0 over the processes of a step; here each
micro-batch of each rank estimates its own (no collective whose count could differ by rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_dpo.losses.output import DPOOutput, check_shapes


@dataclass
class KTOOutput(DPOOutput):
    """KTO's per-row losses. `chosen_rewards` is β·Δ of each row's completion and
    `rejected_rewards` β·Δ' of its KL completion: both β times a response's log-ratio against
    the reference, as `DPOOutput` promises."""

    kl: torch.Tensor  # 0-d, z0 of the batch; detached
    labels: torch.Tensor  # [B] bool, True = desirable

    def accuracy(self, beta: float) -> torch.Tensor:
        """Per row, [B] float64: 1 when the reward sits on its label's side of the reference
        point (β·Δ > β·z0 for a desirable row, < for an undesirable one), ½ on it, else 0."""
        sign = self.labels.double() * 2 - 1  # +1 desirable, -1 undesirable
        margin = sign * (self.chosen_rewards.double() - beta * self.kl.double())
        return (margin > 0).double() + 0.5 * (margin == 0).double()


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log πθ(y'|x) - log πref(y'|x))), detached. Shape: [B], [B] -> 0-d."""
    check_shapes(policy_kl, ref_kl)
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """Per-row KTO losses (module docstring). Shape: all inputs [B] (`labels` bool); outputs [B]."""
    check_shapes(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, labels)
    kl = kto_kl(policy_kl_logps, ref_kl_logps)
    logratios = policy_logps - ref_logps  # [B]
    desirable = labels.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    return KTOOutput(
        losses=losses,
        chosen_rewards=(beta * logratios).detach(),
        rejected_rewards=(beta * (policy_kl_logps - ref_kl_logps)).detach(),
        kl=kl,
        labels=desirable,
    )


def kto_metrics(out: KTOOutput, beta: float) -> dict[str, float]:
    """KTO's held-out metrics: `accuracy`, the share of rows whose reward β·Δ sits on its label's
    side of the reference point β·z0 (`KTOOutput.accuracy`; ½ for a policy equal to its
    reference); `kl`, z0; and the mean reward of the desirable and of the undesirable rows."""
    rewards, desirable = out.chosen_rewards.double(), out.labels

    def mean(values: torch.Tensor) -> float:
        return values.mean().item() if len(values) else float("nan")

    return {
        "accuracy": out.accuracy(beta).mean().item(),
        "kl": out.kl.item(),
        "rewards/desirable": mean(rewards[desirable]),
        "rewards/undesirable": mean(rewards[~desirable]),
    }
