"""The configured objective on a batch: the loss types, weighted, with the options around them.

Order of operations, as in TRL's DPOTrainer: LD-DPO reweights the log-probs (policy and
reference), the f-divergence maps the log-ratios to scores, each loss type is computed and
weighted by `loss_weights`, WPO scales each pair, and the RPO term comes on top. The rewards
are always β·(summed log-ratio) of the unweighted log-probs (see `DPOOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.losses.divergence import FDivergence
from lora_dpo.losses.dpo import (
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    sigmoid_norm_loss,
)
from lora_dpo.losses.kto import kto_loss
from lora_dpo.losses.output import DPOOutput, logratios, rewards_output
from lora_dpo.losses.pairwise import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from lora_dpo.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from lora_dpo.losses.settings import LossSettings
from lora_dpo.losses.terms import ld_logps, rpo_nll_term, sft_loss, wpo_weights


@dataclass(frozen=True)
class PairLogps:
    """A batch of B pairs as the objectives read it; every tensor [B]."""

    policy_chosen: torch.Tensor  # log πθ(yw|x), summed over yw's tokens; carries the graph
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # log πref(yw|x); None for a reference-free objective
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # |yw|
    rejected_tokens: torch.Tensor | None = None
    # LD-DPO (ld_alpha < 1): log-probs of each response's first min(|yw|, |yl|) tokens
    policy_chosen_shared: torch.Tensor | None = None
    policy_rejected_shared: torch.Tensor | None = None
    ref_chosen_shared: torch.Tensor | None = None
    ref_rejected_shared: torch.Tensor | None = None
    # WPO (use_weighting): Σ over each response's tokens of log Σ_v πθ(v|prefix)², the policy's
    chosen_log_sum_sq: torch.Tensor | None = None
    rejected_log_sum_sq: torch.Tensor | None = None
    # KTO's unpaired rows (lora_dpo.data.unpaired): the chosen slot holds each row's completion,
    # the rejected slot its KL completion, and `labels` [B] bool says which rows are desirable.
    labels: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        policy: Any,
        ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None,
        ref_shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> PairLogps:
        """From the policy's `lora_dpo.logps.SequenceLogps` and the reference values of its pairs
        (and, for KTO's unpaired rows, their labels)."""
        half = len(policy.logps) // 2

        def halves(values: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            return (values[:half], values[half:]) if values is not None else (None, None)  # [2B] -> [B], [B]

        policy_chosen_shared, policy_rejected_shared = halves(policy.shared_logps)
        ref_chosen_shared, ref_rejected_shared = ref_shared or (None, None)
        chosen_log_sum_sq, rejected_log_sum_sq = halves(policy.log_sum_sq_probs)
        return cls(
            policy.chosen,
            policy.rejected,
            ref_chosen,
            ref_rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            policy_chosen_shared,
            policy_rejected_shared,
            ref_chosen_shared,
            ref_rejected_shared,
            chosen_log_sum_sq,
            rejected_log_sum_sq,
            labels,
        )

    def require(self, what: str, *names: str) -> list[torch.Tensor]:
        values = [getattr(self, name) for name in names]
        missing = [name for name, value in zip(names, values) if value is None]
        if missing:
            raise ValueError(f"{what} needs {', '.join(missing)}")
        return values


def compute_loss(settings: LossSettings, batch: PairLogps) -> DPOOutput:
    """The objective `settings` configures on `batch`. Shape: [B] in, [B] out."""
    settings.check()
    if settings.unpaired:
        return _unpaired(settings, batch)
    if settings.reference_free:
        out = _reference_free(settings, batch)
    else:
        out = _with_reference(settings, batch)
    if settings.rpo_alpha > 0:
        (chosen_tokens,) = batch.require(f"rpo_alpha={settings.rpo_alpha}", "chosen_tokens")
        out.losses = out.losses + rpo_nll_term(batch.policy_chosen, chosen_tokens, settings.rpo_alpha)
    return out


def _reference_free(s: LossSettings, batch: PairLogps) -> DPOOutput:
    chosen_tokens, rejected_tokens = batch.require(s.loss_type, "chosen_tokens", "rejected_tokens")
    pc, pr = batch.policy_chosen, batch.policy_rejected
    if s.loss_type == "simpo":
        return simpo_loss(pc, pr, chosen_tokens, rejected_tokens, s.beta, s.simpo_gamma, s.label_smoothing)
    if s.loss_type == "cpo":
        return cpo_loss(pc, pr, chosen_tokens, s.beta, s.cpo_alpha, s.label_smoothing)
    return orpo_loss(pc, pr, chosen_tokens, rejected_tokens, s.beta)


def _unpaired(s: LossSettings, batch: PairLogps) -> DPOOutput:
    completion, kl_completion, ref_completion, ref_kl_completion, labels = batch.require(
        f"loss_type={s.loss_type}", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "labels"
    )
    return kto_loss(
        completion,
        ref_completion,
        kl_completion,
        ref_kl_completion,
        labels,
        s.beta,
        s.desirable_weight,
        s.undesirable_weight,
    )


def _with_reference(s: LossSettings, batch: PairLogps) -> DPOOutput:
    pc, pr, rc, rr = batch.require(
        f"loss_type={s.loss_type}", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"
    )
    chosen, rejected = logratios(pc, pr, rc, rr)  # summed: the rewards
    if s.needs_shared_prefix:
        shared = batch.require(
            f"ld_alpha={s.ld_alpha}",
            "policy_chosen_shared",
            "policy_rejected_shared",
            "ref_chosen_shared",
            "ref_rejected_shared",
        )
        pc, pr, rc, rr = (
            ld_logps(total, part, s.ld_alpha) for total, part in zip((pc, pr, rc, rr), shared, strict=True)
        )
    divergence = FDivergence(s.f_divergence_type, s.f_alpha_divergence_coef)
    losses = torch.zeros_like(chosen)
    for loss_type, weight in zip(s.loss_types, s.weights, strict=True):
        losses = losses + weight * _loss_type(loss_type, s, batch, (pc, pr, rc, rr), divergence).losses
    if s.use_weighting:
        losses = losses * wpo_weights(
            batch.policy_chosen,
            batch.policy_rejected,
            *batch.require(
                "use_weighting",
                "chosen_log_sum_sq",
                "rejected_log_sum_sq",
                "chosen_tokens",
                "rejected_tokens",
            ),
        )
    return rewards_output(losses, chosen, rejected, s.beta)


# The losses read nothing but β and the four log-probs.
PAIRWISE_LOSSES = {
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}


def _loss_type(
    loss_type: str,
    s: LossSettings,
    batch: PairLogps,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    divergence: FDivergence,
) -> DPOOutput:
    beta, eps = s.beta, s.label_smoothing
    if loss_type in ("ipo", "sigmoid_norm", "sft"):
        nc, nr = batch.require(f"loss_type={loss_type}", "chosen_tokens", "rejected_tokens")
    if loss_type == "sigmoid":
        return dpo_loss(*logps, beta, eps, divergence)
    if loss_type == "ipo":
        return ipo_loss(*logps, beta, nc, nr, divergence)
    if loss_type == "hinge":
        return hinge_loss(*logps, beta, divergence)
    if loss_type == "robust":
        return robust_dpo_loss(*logps, beta, eps, divergence)
    if loss_type == "exo_pair":
        return exo_pair_loss(*logps, beta, eps, divergence)
    if loss_type == "discopop":
        return discopop_loss(*logps, beta, s.discopop_tau, divergence)
    if loss_type == "sigmoid_norm":
        return sigmoid_norm_loss(*logps, beta, nc, nr, divergence)
    if loss_type == "sft":
        return sft_loss(*logps, beta, nc)
    if loss_type in ("aot", "aot_unpaired"):
        return (aot_loss if loss_type == "aot" else aot_unpaired_loss)(*logps, beta, eps)
    return PAIRWISE_LOSSES[loss_type](*logps, beta)  # settings.check() refused the rest


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    **settings: Any,
) -> DPOOutput:
    """`compute_loss` in keyword form: `settings` are `LossSettings` fields (loss_type="ipo",
    label_smoothing=0.1, rpo_alpha=..., ...). For the statistics that LD-DPO and WPO read, build
    a `PairLogps` and call `compute_loss`. Shape: all inputs [B]; all outputs [B]."""
    return compute_loss(
        LossSettings(beta, **settings),
        PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens),
    )
