"""Reference-free objectives: no reference model, so no reference cache.

Each takes the policy's per-pair summed response log-probs and token counts, all `[B]`:
log πθ(yw|x), log πθ(yl|x), |yw|, |yl|. Names and parameters are those of TRL's CPOTrainer
(`cpo` is its `loss_type="sigmoid"`, `simpo` its `loss_type="simpo"`) and ORPOTrainer. With
no reference, the rewards are each objective's own implicit reward (see `DPOOutput`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_dpo.losses.output import DPOOutput, check_shapes, per_token, soft_label_sigmoid
from lora_dpo.losses.terms import rpo_nll_term


def _rewards(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> DPOOutput:
    return DPOOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """`simpo`: simple preference optimisation, the reward a length-normalised log-likelihood.

    Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward": the reward of a response is its mean token log-prob times β, and the chosen one
    must win by a target margin γ (TRL's `simpo_gamma`):

        L = -log σ( β·log πθ(yw|x)/|yw| - β·log πθ(yl|x)/|yl| - γ )

    with cDPO's label smoothing ε as TRL's CPOTrainer allows. The paper's β is far larger than
    DPO's (2 to 10). TRL's CPOTrainer adds its NLL term by default (CPO-SimPO); here that is
    `rpo_alpha` on top of this loss, which is the paper's SimPO alone. Rewards: β·log πθ(y|x)/|y|.

    Shape: all inputs [B]; all outputs [B].
    """
    check_shapes(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    chosen, rejected = per_token(policy_chosen, chosen_tokens), per_token(policy_rejected, rejected_tokens)
    logits = chosen - rejected - gamma / beta  # [B]
    return _rewards(soft_label_sigmoid(beta * logits, label_smoothing), chosen, rejected, beta)


def cpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    beta: float,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """`cpo`: contrastive preference optimisation, DPO without the reference plus the chosen NLL.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", Eq. 3 (the preference term: DPO with a uniform
    reference) plus a behaviour-cloning NLL term weighted by α (TRL's `cpo_alpha`, default 1):

        L = -log σ(β·(log πθ(yw|x) - log πθ(yl|x)))  +  α·L_NLL

    where L_NLL is the batch's NLL per chosen token (`rpo_nll_term`), and with cDPO's label
    smoothing ε on the first term as in TRL. Rewards: β·log πθ(y|x), summed.

    Shape: all inputs [B]; all outputs [B].
    """
    check_shapes(policy_chosen, policy_rejected, chosen_tokens)
    losses = soft_label_sigmoid(beta * (policy_chosen - policy_rejected), label_smoothing)
    if cpo_alpha:
        losses = losses + rpo_nll_term(policy_chosen, chosen_tokens, cpo_alpha)
    return _rewards(losses, policy_chosen, policy_rejected, beta)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Mächler 2012: expm1 near 0, log1p far)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """`orpo`: odds ratio preference optimisation, preference and SFT in one loss.

    Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 4 and 7, with P the mean token likelihood exp(log πθ(y|x)/|y|) and
    odds(y) = P / (1 - P):

        log OR = log odds(yw) - log odds(yl)
               = (p_w - p_l) - (log(1 - e^p_w) - log(1 - e^p_l)),   p = log πθ(y|x)/|y|
        L = L_NLL - λ·log σ(log OR)

    λ is TRL's ORPO `beta`; L_NLL the batch's NLL per chosen token (`rpo_nll_term`, α = 1).
    Rewards: β·log πθ(y|x)/|y|, as TRL logs them.

    Shape: all inputs [B]; all outputs [B].
    """
    check_shapes(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    chosen, rejected = per_token(policy_chosen, chosen_tokens), per_token(policy_rejected, rejected_tokens)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # [B]
    losses = rpo_nll_term(policy_chosen, chosen_tokens, 1.0) - beta * F.logsigmoid(log_odds)
    return _rewards(losses, chosen, rejected, beta)
