"""Preference objectives as pure tensor functions: DPO and its main variants.

Every function takes per-pair summed response log-probs, all `[B]`:

    policy_chosen  = log πθ(yw|x)     ref_chosen   = log πref(yw|x)   (a constant: the cache)
    policy_rejected = log πθ(yl|x)    ref_rejected = log πref(yl|x)

and returns a `DPOOutput` of `[B]` tensors. With Δw = log πθ(yw|x) - log πref(yw|x), Δl likewise,
and z = Δw - Δl, the variants differ only in the function of z they minimise. The reference terms
never meet β, so one reference cache serves every variant and every β. The rewards they return
are one quantity for every variant (β·Δ, see `DPOOutput`), so runs of different variants, and a
run's training and eval records, are compared in one unit.

Names follow TRL's `loss_type` so settings carry over: `sigmoid` (DPO; cDPO with label
smoothing), `ipo`, `hinge`, `robust`, plus the RPO term (TRL's `rpo_alpha`) on top of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lora_dpo.config import TrainConfig

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# Loss types whose formula reads `label_smoothing`; elsewhere a non-zero value is a config error.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


@dataclass
class DPOOutput:
    """Per-pair losses and implicit rewards.

    The rewards are the DPO implicit rewards of the whole responses, β times the summed
    log-ratio against the reference, for EVERY loss type: a length-normalised variant (IPO)
    normalises inside its loss only. So `rewards / β` is always the change in nats of each
    response's log-likelihood against the reference, which the health checks rely on.
    """

    losses: torch.Tensor  # [B] the objective per pair (the RPO term included); carries the graph
    # [B] β·(log πθ(yw|x) - log πref(yw|x)), log-probs summed over yw's tokens; detached
    chosen_rewards: torch.Tensor
    # [B] β·(log πθ(yl|x) - log πref(yl|x)), log-probs summed over yl's tokens; detached
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossSettings:
    """The objective `train.*` configures, as one value for every caller of `preference_loss`
    (training and eval score pairs with the same loss)."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, train: "TrainConfig") -> "LossSettings":
        return cls(train.beta, train.loss_type, train.label_smoothing, train.rpo_alpha)


def _check_shapes(*tensors: torch.Tensor) -> None:
    first = tensors[0]
    assert first.dim() == 1, f"expected [B] log-prob sums, got shape {tuple(first.shape)}"
    assert all(t.shape == first.shape for t in tensors), [tuple(t.shape) for t in tensors]


def _output(losses: torch.Tensor, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> DPOOutput:
    # The implicit rewards are metrics, not part of the graph.
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Sigmoid DPO per pair; with `label_smoothing` ε > 0, conservative DPO (cDPO).

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:

        L = -log σ(β z)

    Mitchell 2023, "A note on DPO with noisy preferences" (cDPO): each label is taken to be
    flipped with probability ε, so the target is a soft label (1-ε, ε):

        L = -(1-ε)·log σ(β z) - ε·log σ(-β z)  =  softplus(-β z) + ε·β z

    (the right-hand form uses softplus(x) - softplus(-x) = x). ε = 0 is plain DPO.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_logratios = policy_chosen - ref_chosen  # [B]
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    logits = beta * (chosen_logratios - rejected_logratios)  # [B]
    # -log σ(x) = softplus(-x), computed stably for large |x|.
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return _output(losses, chosen_logratios, rejected_logratios, beta)


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> DPOOutput:
    """Robust DPO (rDPO): an unbiased loss under labels flipped with probability ε < 1/2.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", Eq. 5:

        L = [(1-ε)·(-log σ(β z)) - ε·(-log σ(-β z))] / (1 - 2ε)  =  softplus(-β z) - ε·β z / (1 - 2ε)

    Its expectation over the label noise equals the clean DPO loss; unlike cDPO it is not
    bounded below (it rewards ever larger margins on pairs it deems trustworthy).

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_logratios = policy_chosen - ref_chosen  # [B]
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    logits = beta * (chosen_logratios - rejected_logratios)  # [B]
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _output(losses, chosen_logratios, rejected_logratios, beta)


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """Hinge loss on the implicit reward margin (SLiC).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 2,
    on reference-normalised likelihoods as in Liu et al. 2024, "Statistical Rejection Sampling
    Improves Preference Optimization" (RSO), with the margin δ = 1/β and scaled by β:

        L = β·max(0, 1/β - z) = max(0, 1 - β z)

    A pair stops contributing once its reward margin β z reaches 1.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_logratios = policy_chosen - ref_chosen  # [B]
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return _output(losses, chosen_logratios, rejected_logratios, beta)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> DPOOutput:
    """Identity preference optimisation, length-normalised as TRL does it.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17, with β as the regulariser τ:

        h = (log πθ(yw|x) - log πref(yw|x)) / |yw|  -  (log πθ(yl|x) - log πref(yl|x)) / |yl|
        L = (h - 1/(2β))²

    Every log-prob is divided by its response's token count (policy and reference alike: the
    counts are the same pair's), so long responses do not dominate a squared loss. IPO
    regresses the margin to 1/(2β) instead of pushing it to infinity.

    The returned rewards are the summed ones, β·Δ, like every variant's (TRL reports β·Δ/|y|
    for IPO): the per-token log-ratios stay inside the loss, so no metric mixes two units.

    Shape: log-prob sums and token counts all [B]; outputs [B].
    """
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
    chosen_logratios = policy_chosen - ref_chosen  # [B] summed over the response
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    per_token_margin = (
        chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    )  # [B] h
    losses = (per_token_margin - 1 / (2 * beta)) ** 2
    return _output(losses, chosen_logratios, rejected_logratios, beta)


def rpo_nll_term(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """The RPO auxiliary term: α times the negative log-likelihood of the chosen responses.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1: L_DPO + α·L_NLL.
    As in TRL (`rpo_alpha`), L_NLL is the mean NLL per chosen token over the whole batch,

        L_NLL = -Σ_i log πθ(yw_i|x_i) / Σ_i |yw_i|

    (the paper normalises each sequence by its own length; the two agree when lengths are
    equal). It is returned shared out over the pairs, term_i = α·B·(-log πθ(yw_i|x_i)) / Σ|yw|,
    so that the mean over the batch of (pair loss + term) equals TRL's loss.

    Shape: policy_chosen, chosen_tokens [B]; output [B].
    """
    _check_shapes(policy_chosen, chosen_tokens)
    total_tokens = chosen_tokens.sum().clamp(min=1)
    return alpha * len(policy_chosen) * (-policy_chosen) / total_tokens


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> DPOOutput:
    """The loss `train.loss_type` names, plus the RPO term when `rpo_alpha` > 0.

    `chosen_tokens` / `rejected_tokens` ([B] response token counts) are needed by `ipo` and by
    the RPO term. Shape: all inputs [B]; all outputs [B].
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"label_smoothing applies to {' and '.join(SMOOTHED_LOSS_TYPES)}, not {loss_type}")
    needs_counts = loss_type == "ipo" or rpo_alpha > 0
    if needs_counts and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type={loss_type} with rpo_alpha={rpo_alpha} needs the response token counts")
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "sigmoid":
        out = dpo_loss(*logps, beta, label_smoothing)
    elif loss_type == "robust":
        out = robust_dpo_loss(*logps, beta, label_smoothing)
    elif loss_type == "hinge":
        out = hinge_loss(*logps, beta)
    else:
        out = ipo_loss(*logps, beta, chosen_tokens, rejected_tokens)
    if rpo_alpha > 0:
        out.losses = out.losses + rpo_nll_term(policy_chosen, chosen_tokens, rpo_alpha)
    return out
