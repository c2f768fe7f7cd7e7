"""DPO and the losses that are functions of its reward margin.

Each takes per-pair summed response log-probs, all `[B]`:

    policy_chosen  = log πθ(yw|x)     ref_chosen   = log πref(yw|x)   (a constant: the cache)
    policy_rejected = log πθ(yl|x)    ref_rejected = log πref(yl|x)

With Δw = log πθ(yw|x) - log πref(yw|x), Δl likewise, and the margin z = Δw - Δl, each loss
is a function of z alone (of the per-token margin for ipo and sigmoid_norm). Under an
f-divergence (`divergence`, see lora_dpo/losses/divergence.py) z becomes f'(e^Δw) - f'(e^Δl);
reverse KL, the default, is z itself. The rewards are β·Δ for all of them (`DPOOutput`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_dpo.losses.divergence import REVERSE_KL, FDivergence
from lora_dpo.losses.output import (
    DPOOutput,
    check_shapes,
    logratios,
    per_token,
    rewards_output,
    soft_label_sigmoid,
)


def _margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    divergence: FDivergence,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Δw, Δl, f'(e^Δw), f'(e^Δl)), [B] each."""
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return chosen, rejected, divergence.scores(chosen), divergence.scores(rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`sigmoid`: DPO per pair; with `label_smoothing` ε > 0, conservative DPO (cDPO).

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:

        L = -log σ(β z)

    Mitchell 2023, "A note on DPO with noisy preferences" (cDPO): each label is taken to be
    flipped with probability ε, so the target is a soft label (1-ε, ε):

        L = -(1-ε)·log σ(β z) - ε·log σ(-β z)  =  softplus(-β z) + ε·β z

    (the right-hand form uses softplus(x) - softplus(-x) = x). ε = 0 is plain DPO.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    losses = soft_label_sigmoid(beta * (chosen_scores - rejected_scores), label_smoothing)
    return rewards_output(losses, chosen, rejected, beta)


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`robust`: robust DPO (rDPO), an unbiased loss under labels flipped with probability ε < 1/2.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", Eq. 5:

        L = [(1-ε)·(-log σ(β z)) - ε·(-log σ(-β z))] / (1 - 2ε)  =  softplus(-β z) - ε·β z / (1 - 2ε)

    Its expectation over the label noise equals the clean DPO loss; unlike cDPO it is not
    bounded below (it rewards ever larger margins on pairs it deems trustworthy).

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    logits = beta * (chosen_scores - rejected_scores)  # [B]
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return rewards_output(losses, chosen, rejected, beta)


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`hinge`: hinge loss on the implicit reward margin (SLiC).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 2,
    on reference-normalised likelihoods as in Liu et al. 2024, "Statistical Rejection Sampling
    Improves Preference Optimization" (RSO), with the margin δ = 1/β and scaled by β:

        L = β·max(0, 1/β - z) = max(0, 1 - β z)

    A pair stops contributing once its reward margin β z reaches 1.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    losses = torch.relu(1 - beta * (chosen_scores - rejected_scores))
    return rewards_output(losses, chosen, rejected, beta)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`ipo`: identity preference optimisation, length-normalised as TRL does it.

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
    check_shapes(policy_chosen, chosen_tokens, rejected_tokens)
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    per_token_margin = per_token(chosen_scores, chosen_tokens) - per_token(
        rejected_scores, rejected_tokens
    )  # [B] h
    losses = (per_token_margin - 1 / (2 * beta)) ** 2
    return rewards_output(losses, chosen, rejected, beta)


def sigmoid_norm_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`sigmoid_norm`: DPO on the per-token margin, against length bias.

    The length normalisation of Meng et al. 2024, "SimPO: Simple Preference Optimization with
    a Reference-Free Reward", applied to DPO's log-ratios, as TRL's `sigmoid_norm`:

        L = -log σ(β·(Δw/|yw| - Δl/|yl|))

    Shape: log-prob sums and token counts all [B]; outputs [B].
    """
    check_shapes(policy_chosen, chosen_tokens, rejected_tokens)
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    margin = per_token(chosen_scores, chosen_tokens) - per_token(rejected_scores, rejected_tokens)  # [B]
    return rewards_output(-F.logsigmoid(beta * margin), chosen, rejected, beta)


def exo_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`exo_pair`: efficient exact optimisation (EXO) of the alignment objective, pairwise.

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16
    with K = 2: minimise KL(q || p) from the policy's preference distribution over the pair,
    q = (σ(β z), σ(-β z)), to the smoothed labels p = (1-ε, ε):

        L = σ(β z)·(log σ(β z) - log(1-ε)) + σ(-β z)·(log σ(-β z) - log ε)

    ε must be > 0 (log ε); the paper recommends 1e-3. Unlike DPO's forward KL to the labels,
    this reverse KL is mode-seeking. Shape: all inputs [B]; all outputs [B].
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    logits = beta * (chosen_scores - rejected_scores)  # [B]
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    eps = torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    losses = torch.exp(log_q_chosen) * (log_q_chosen - torch.log1p(-eps)) + torch.exp(log_q_rejected) * (
        log_q_rejected - torch.log(eps)
    )
    return rewards_output(losses, chosen, rejected, beta)


def discopop_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    tau: float = 0.05,
    divergence: FDivergence = REVERSE_KL,
) -> DPOOutput:
    """`discopop`: the log-ratio modulated loss found by LLM-driven search (DiscoPOP).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", Eq. 5, with ρ = β z and the temperature τ (TRL's `discopop_tau`, paper: 0.05):

        m = σ(ρ / τ),   L = (1 - m)·(-log σ(ρ)) + m·e^(-ρ)

    a blend of the logistic (DPO) and the exponential loss. m·e^(-ρ) is computed as
    exp(log σ(ρ/τ) - ρ): equal, and finite where e^(-ρ) alone would overflow.

    Shape: all inputs [B] summed response log-probs; all outputs [B].
    """
    chosen, rejected, chosen_scores, rejected_scores = _margin(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, divergence
    )
    logits = beta * (chosen_scores - rejected_scores)  # [B] ρ
    modulation = torch.sigmoid(logits / tau)
    losses = (1 - modulation) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / tau) - logits)
    return rewards_output(losses, chosen, rejected, beta)
