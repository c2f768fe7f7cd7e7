"""Losses that treat the chosen and rejected rewards apart, or the batch as a distribution.

Inputs as in lora_dpo/losses/dpo.py: per-pair summed response log-probs, all `[B]`, with
Δw = log πθ(yw|x) - log πref(yw|x), Δl likewise, and the implicit rewards rw = β Δw,
rl = β Δl. None of these is a function of Δw - Δl alone, so none takes an f-divergence
(TRL refuses the combination). The rewards are β·Δ for all of them (`DPOOutput`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_dpo.losses.output import DPOOutput, logratios, rewards_output, soft_label_sigmoid


def nca_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`nca_pair`: noise contrastive alignment, pairwise.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (NCA), the pairwise-preference form TRL implements:

        L = -log σ(rw) - ½·log σ(-rw) - ½·log σ(-rl)

    Each response's reward is judged on its own, not only against the other's, so (unlike DPO)
    the chosen likelihood is pushed up instead of only the margin. Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    rw, rl = beta * chosen, beta * rejected
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return rewards_output(losses, chosen, rejected, beta)


def bco_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`bco_pair`: binary classifier optimisation on pairs.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (BCO): the chosen response a positive and the rejected one a negative of a logistic
    classifier on the implicit reward:

        L = -log σ(rw) - log σ(-rl)

    as TRL's DPOTrainer `bco_pair` computes it: without the paper's reward shift δ (a running
    mean of the rewards), so it needs no statistic beyond the batch. Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return rewards_output(losses, chosen, rejected, beta)


def sppo_hard_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`sppo_hard`: self-play preference optimisation with hard win probabilities.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (SPPO),
    Eq. 4.7 with the win probability P set to 1 for the chosen and 0 for the rejected response
    (the paper estimates a soft P with a preference model):

        L = (Δw - 1/(2β))² + (Δl + 1/(2β))²

    Each log-ratio is regressed to its own target, ±1/(2β). Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return rewards_output(losses, chosen, rejected, beta)


def apo_zero_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`apo_zero`: anchored preference optimisation, for chosen responses better than the model.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment" (APO), Eq. 7:

        L = (1 - σ(rw)) + σ(rl)

    pushes the chosen likelihood up and the rejected one down, each against the reference.
    Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return rewards_output(losses, chosen, rejected, beta)


def apo_down_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`apo_down`: anchored preference optimisation, for chosen responses worse than the model.

    D'Oosterlinck et al. 2024 (APO), Eq. 8:

        L = σ(rw) + (1 - σ(rw - rl))

    pushes both likelihoods down, the rejected one more. Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return rewards_output(losses, chosen, rejected, beta)


def aot_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """`aot`: alignment via optimal transport, paired.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (AOT): the policy's log-likelihood ratios should stochastically dominate the reference's.
    With the batch's ratios sorted, s_(i) the i-th smallest of log πθ(yw|x) - log πθ(yl|x) and
    t_(i) that of log πref(yw|x) - log πref(yl|x), the i-th loss is cDPO's on δ_(i) = s_(i) - t_(i):

        L_i = -(1-ε)·log σ(β δ_(i)) - ε·log σ(-β δ_(i))

    The i-th loss belongs to a quantile of the batch, not to pair i (only the batch mean has a
    meaning), and it depends on which pairs share the batch (a micro-batch in training, all
    held-out pairs at once in eval); larger batches estimate the quantiles better.
    Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    policy_sorted = torch.sort(policy_chosen - policy_rejected).values  # [B]
    ref_sorted = torch.sort(ref_chosen - ref_rejected).values  # [B]
    losses = soft_label_sigmoid(beta * (policy_sorted - ref_sorted), label_smoothing)
    return rewards_output(losses, chosen, rejected, beta)


def aot_unpaired_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """`aot_unpaired`: alignment via optimal transport, unpaired.

    Melnyk et al. 2024 (AOT), for chosen and rejected responses that need not come in pairs:
    the chosen log-ratios Δw should dominate the rejected ones Δl as distributions. With each
    sorted over the batch, δ_(i) = Δw_(i) - Δl_(i) and

        L_i = -(1-ε)·log σ(β δ_(i)) - ε·log σ(-β δ_(i))

    As for `aot`, L_i belongs to a quantile, not to pair i. Shape: [B] in, [B] out.
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    delta = torch.sort(chosen).values - torch.sort(rejected).values  # [B]
    losses = soft_label_sigmoid(beta * delta, label_smoothing)
    return rewards_output(losses, chosen, rejected, beta)
