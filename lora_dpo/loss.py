"""DPO objective as a pure tensor function.

Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:

    L = -log σ( β·[(log πθ(yw|x) - log πref(yw|x)) - (log πθ(yl|x) - log πref(yl|x))] )

The reference terms are constants (the reference cache); β does not touch them, so one cache
serves any number of β values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOOutput:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] β·(log πθ(yw|x) - log πref(yw|x)), detached
    rejected_rewards: torch.Tensor  # [B] β·(log πθ(yl|x) - log πref(yl|x)), detached


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """Sigmoid DPO loss per pair.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    The implicit rewards are returned detached: they are metrics, not part of the graph.
    """
    assert policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape
    chosen_logratios = policy_chosen - ref_chosen  # [B]
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    logits = beta * (chosen_logratios - rejected_logratios)  # [B]
    # -log σ(z) = softplus(-z), computed stably for large |z|.
    losses = -F.logsigmoid(logits)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
