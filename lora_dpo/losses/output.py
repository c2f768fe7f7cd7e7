"""What every objective returns, and the helpers the loss formulas share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOOutput:
    """Per-pair losses and implicit rewards.

    For every objective with a reference, the rewards are the DPO implicit rewards of the whole
    responses, β times the summed log-ratio against the reference: a length-normalised variant
    (IPO, sigmoid_norm) normalises inside its loss only, LD-DPO down-weights tokens inside its
    loss only. So `rewards / β` is always the change in nats of each response's log-likelihood
    against the reference, which the health checks rely on.

    A reference-free objective (simpo, orpo, cpo) has no reference to compare with: its rewards
    are its own implicit reward, as TRL logs it: β·(mean token log-prob) for simpo and orpo,
    β·(summed log-prob) for cpo.
    """

    losses: torch.Tensor  # [B] the objective per pair (the RPO term included); carries the graph
    # [B] β·(log πθ(yw|x) - log πref(yw|x)), log-probs summed over yw's tokens; detached
    chosen_rewards: torch.Tensor
    # [B] β·(log πθ(yl|x) - log πref(yl|x)), log-probs summed over yl's tokens; detached
    rejected_rewards: torch.Tensor


def check_shapes(*tensors: torch.Tensor) -> None:
    first = tensors[0]
    assert first.dim() == 1, f"expected [B] log-prob sums, got shape {tuple(first.shape)}"
    assert all(t.shape == first.shape for t in tensors), [tuple(t.shape) for t in tensors]


def rewards_output(
    losses: torch.Tensor, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> DPOOutput:
    """The losses with the rewards β·Δ; the rewards are metrics, not part of the graph."""
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def logratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δw, Δl) = (log πθ(yw|x) - log πref(yw|x), log πθ(yl|x) - log πref(yl|x)), [B] each."""
    check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def soft_label_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε)·log σ(x) - ε·log σ(-x): the logistic loss against the soft label (1-ε, ε).
    Stable for large |x| (log σ(x) = -softplus(-x)); ε = 0 is -log σ(x)."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def per_token(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values / token count, [B]; a count of 0 (never in a cache) divides by 1."""
    return values / tokens.clamp(min=1)
