"""Pieces that combine with the losses: the chosen NLL (RPO, `sft`, CPO, ORPO), LD-DPO's
token down-weighting and WPO's pair weights."""

from __future__ import annotations

import torch

from lora_dpo.losses.output import DPOOutput, check_shapes, logratios, per_token, rewards_output


def rpo_nll_term(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """The RPO auxiliary term: α times the negative log-likelihood of the chosen responses.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1: L_DPO + α·L_NLL.
    As in TRL (`rpo_alpha`), L_NLL is the mean NLL per chosen token over the whole batch,

        L_NLL = -Σ_i log πθ(yw_i|x_i) / Σ_i |yw_i|

    (the paper normalises each sequence by its own length; the two agree when lengths are
    equal). It is returned shared out over the pairs, term_i = α·B·(-log πθ(yw_i|x_i)) / Σ|yw|,
    so that the mean over the batch of (pair loss + term) equals TRL's loss. CPO's and ORPO's
    NLL terms are the same quantity (TRL's cross-entropy over the chosen response tokens).

    Shape: policy_chosen, chosen_tokens [B]; output [B].
    """
    check_shapes(policy_chosen, chosen_tokens)
    total_tokens = chosen_tokens.sum().clamp(min=1)
    return alpha * len(policy_chosen) * (-policy_chosen) / total_tokens


def sft_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_tokens: torch.Tensor,
) -> DPOOutput:
    """`sft`: supervised fine-tuning on the chosen responses, as a loss to combine with others.

        L = -Σ_i log πθ(yw_i|x_i) / Σ_i |yw_i|   (the batch's NLL per chosen token)

    Every pair gets the batch value, as in TRL, so a WPO weight scales it per pair; its batch
    mean, and its gradient, equal `rpo_nll_term` with α = 1. Used with `sigmoid` and `bco_pair`
    by Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
    Mixed Preference Optimization" (MPO: loss_type sigmoid+bco_pair+sft, weights 0.8, 0.2, 1.0).

    Shape: all inputs [B]; all outputs [B].
    """
    chosen, rejected = logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    check_shapes(policy_chosen, chosen_tokens)
    nll = -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)
    return rewards_output(nll.expand(len(policy_chosen)), chosen, rejected, beta)


def ld_logps(logps: torch.Tensor, shared_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's length-desensitised log-probs of a response.

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization" (LD-DPO): the
    first l_p = min(|yw|, |yl|) tokens of each response of a pair (the part both have) count
    fully, the excess "verbose" tail with weight α ∈ [0, 1]:

        log π̂(y|x) = Σ_{t <= l_p} log π(y_t | x, y_<t)  +  α·Σ_{t > l_p} log π(y_t | x, y_<t)
                   = shared + α·(total - shared)

    for policy and reference alike; α = 1 is plain DPO. Shape: [B] in, [B] out.
    """
    check_shapes(logps, shared_logps)
    return shared_logps + alpha * (logps - shared_logps)


def wpo_weights(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_log_sum_sq: torch.Tensor,
    rejected_log_sum_sq: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """WPO's per-pair weight, detached: how likely the policy is to generate the pair now.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2 with
    TRL's aligned form: each token's probability is taken relative to the policy's own
    sharpness Σ_v πθ(v|·)², and the weight of a response is the geometric mean over its tokens,

        w(y) = exp( Σ_t [log πθ(y_t|x, y_<t) - log Σ_v πθ(v|x, y_<t)²] / |y| ),  weight = w(yw)·w(yl)

    `*_log_sum_sq` are the per-response sums Σ_t log Σ_v πθ(v|·)² (lora_dpo.logps computes them
    with the log-probs). The weight multiplies each pair's loss and carries no gradient, so
    off-policy pairs count less. Shape: all inputs [B]; output [B].
    """
    check_shapes(
        policy_chosen, policy_rejected, chosen_log_sum_sq, rejected_log_sum_sq, chosen_tokens, rejected_tokens
    )
    chosen = per_token(policy_chosen.detach() - chosen_log_sum_sq, chosen_tokens)  # [B]
    rejected = per_token(policy_rejected.detach() - rejected_log_sum_sq, rejected_tokens)
    return torch.exp(chosen + rejected).detach()
