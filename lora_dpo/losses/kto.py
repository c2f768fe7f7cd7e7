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


def weight_advice(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """TRL's advice for unbalanced data, from the paper's Eq. 8 (λD·nD / (λU·nU) in [1, 4/3]):
    a line recommending a range for either weight when neither is in it; None when one is."""
    n_d, n_u = max(desirable, 1), max(undesirable, 1)
    if n_d == n_u:
        return None
    desirable_range = (
        round(n_u * undesirable_weight / n_d, 2),
        round(n_u * undesirable_weight / n_d * 1.33, 2),
    )
    undesirable_range = (
        round(n_d * desirable_weight / n_u / 1.33, 2),
        round(n_d * desirable_weight / n_u, 2),
    )
    if (
        desirable_range[0] <= desirable_weight <= desirable_range[1]
        or undesirable_range[0] <= undesirable_weight <= undesirable_range[1]
    ):
        return None
    return (
        f"{desirable} desirable and {undesirable} undesirable rows: with train.desirable_weight="
        f"{desirable_weight} and train.undesirable_weight={undesirable_weight}, the KTO paper's balance "
        f"(Eq. 8) suggests EITHER train.desirable_weight in [{desirable_range[0]}, {desirable_range[1]}] OR "
        f"train.undesirable_weight in [{undesirable_range[0]}, {undesirable_range[1]}] (not both)"
    )
