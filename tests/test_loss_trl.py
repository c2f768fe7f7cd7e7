"""Every loss type and option against TRL's formulas, re-derived here on random inputs.

`trl_dpo_loss` transcribes the loss section of TRL 1.16's `DPOTrainer._compute_loss` in
float64, from per-token log-probs and completion masks (TRL's inputs): LD-DPO's shared/tail
masks from the cumulative token position, the f-divergence scores, every `loss_type`, the
weighted sum, and WPO's weights from per-token `log_sum_sq_probs`. Ours runs on per-response
sums; the sums the test hands it are taken from the same per-token values. `trl_cpo_loss` and
`trl_orpo_loss` do the same for TRL's CPOTrainer and ORPOTrainer.

One deliberate difference: TRL's logged rewards under LD-DPO are β·(LD-weighted log-ratio);
ours are always β·(summed log-ratio) (see DPOOutput).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from lora_dpo.losses import LossSettings, PairLogps, compute_loss
from lora_dpo.losses.settings import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES

F64 = torch.float64
B, T = 8, 12


def trl_dpo_loss(
    loss_types,
    loss_weights,
    beta,
    eps,
    per_token,
    ref_per_token,
    mask,
    ld_alpha=None,
    f_divergence="reverse_kl",
    f_coef=0.5,
    tau=0.05,
    log_sum_sq=None,
):
    """TRL 1.16 DPOTrainer: per_token [2B, T] policy log-probs, chosen rows first; mask [2B, T]."""
    if ld_alpha is None:
        logps, ref_logps = (per_token * mask).sum(1), (ref_per_token * mask).sum(1)
    else:
        comp_pos = mask.cumsum(dim=1)
        # TRL's per-token log-probs are 0 off the completion; here `& (mask > 0)` says so.
        chosen_lens, rejected_lens = mask.sum(dim=1).long().chunk(2, dim=0)
        shared_lens = torch.minimum(chosen_lens, rejected_lens)
        shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1)) & (mask > 0)
        tail_mask = (comp_pos > shared_lens.unsqueeze(1)) & (mask > 0)
        logps = (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)
        ref_logps = (ref_per_token * shared_mask).sum(1) + ld_alpha * (ref_per_token * tail_mask).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(f_coef - 1.0) < 1e-6):
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence == "forward_kl":
        chosen_scores, rejected_scores = 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    elif f_divergence == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        coef = 1.0 / (f_coef - 1.0)
        chosen_scores = (torch.exp(torch.clamp((f_coef - 1.0) * chosen_logratios, max=80.0)) - 1.0) * coef
        rejected_scores = (torch.exp(torch.clamp((f_coef - 1.0) * rejected_logratios, max=80.0)) - 1.0) * coef
    delta_score = chosen_scores - rejected_scores
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sigmoid":
            per_sequence_loss = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per_sequence_loss = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            ipo_delta = chosen_scores / chosen_mask.sum(1).clamp(
                min=1.0
            ) - rejected_scores / rejected_mask.sum(1).clamp(min=1.0)
            per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(eps, dtype=F64)
            qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
            ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
            per_sequence_loss = qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
        elif loss_type == "nca_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            per_sequence_loss = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
            flipped = -eps * F.logsigmoid(-beta * delta_score)
            per_sequence_loss = (clean - flipped) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            per_sequence_loss = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(
                -beta * rejected_logratios
            )
        elif loss_type == "sppo_hard":
            per_sequence_loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                delta = (
                    torch.sort(chosen_logps - rejected_logps, dim=0)[0]
                    - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
                )
            else:
                delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
            per_sequence_loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif loss_type == "apo_zero":
            per_sequence_loss = (
                1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
            )
        elif loss_type == "apo_down":
            per_sequence_loss = (
                torch.sigmoid(beta * chosen_logratios)
                + 1
                - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":
            logits = delta_score * beta
            modulation = torch.sigmoid(logits / tau)
            per_sequence_loss = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sft":
            chosen_per_token = per_token.chunk(2)[0]
            per_sequence_loss = (-chosen_per_token[chosen_mask.bool()].mean()).expand(B)
        elif loss_type == "sigmoid_norm":
            delta = chosen_scores / chosen_mask.sum(1).clamp(min=1.0) - rejected_scores / rejected_mask.sum(
                1
            ).clamp(min=1.0)
            per_sequence_loss = -F.logsigmoid(beta * delta)
        if log_sum_sq is not None:
            aligned = (per_token - log_sum_sq) * mask
            weights = torch.exp(aligned.sum(1) / mask.sum(1).clamp_min(1))
            chosen_weights, rejected_weights = weights.chunk(2)
            per_sequence_loss = per_sequence_loss * chosen_weights * rejected_weights
        loss = loss + per_sequence_loss.mean() * loss_weight
    return loss, beta * chosen_logratios, beta * rejected_logratios


def random_pairs(seed):
    """Per-token policy and reference log-probs [2B, T], completion masks of random lengths
    (chosen rows first), and per-token log Σp² for WPO."""
    gen = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * B, T, generator=gen, dtype=F64) * 3
    ref_per_token = per_token + torch.randn(2 * B, T, generator=gen, dtype=F64) * 0.5
    ref_per_token = ref_per_token.clamp(max=-1e-3)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    log_sum_sq = -torch.rand(2 * B, T, generator=gen, dtype=F64) * 2
    return per_token, ref_per_token, mask, log_sum_sq


def our_batch(per_token, ref_per_token, mask, log_sum_sq=None):
    """The sums our losses read, from the same per-token values (shared prefix: first
    min(|yw|, |yl|) tokens of each response)."""
    lengths = mask.sum(1).long()
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)  # [2B]
    shared_mask = mask * (torch.arange(T)[None, :] < shared[:, None])
    sums = lambda values, m: (values * m).sum(1).chunk(2)  # noqa: E731
    (pc, pr), (rc, rr) = sums(per_token, mask), sums(ref_per_token, mask)
    (pcs, prs), (rcs, rrs) = sums(per_token, shared_mask), sums(ref_per_token, shared_mask)
    nc, nr = lengths.chunk(2)
    lsq = sums(log_sum_sq, mask) if log_sum_sq is not None else (None, None)
    return PairLogps(pc, pr, rc, rr, nc, nr, pcs, prs, rcs, rrs, *lsq)


CASES = [
    dict(loss_type=t, label_smoothing=0.2 if t in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0)
    for t in DPO_LOSS_TYPES
]
CASES += [
    dict(loss_type="sigmoid+bco_pair+sft", loss_weights=(0.8, 0.2, 1.0)),  # MPO
    dict(loss_type="ipo+hinge+discopop", loss_weights=(1.0, 0.5, 2.0), discopop_tau=0.2),
    dict(loss_type="sigmoid", ld_alpha=0.3),
    dict(loss_type="ipo", ld_alpha=0.0),
    dict(loss_type="aot", ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="sigmoid+sft", use_weighting=True),
    dict(loss_type="bco_pair", use_weighting=True, ld_alpha=0.5),
]
CASES += [
    dict(loss_type=t, f_divergence_type=f, label_smoothing=0.2 if t in ("robust", "exo_pair") else 0.0)
    for t in F_DIVERGENCE_LOSS_TYPES
    for f in ("forward_kl", "js_divergence")
]
CASES += [
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=a)
    for a in (0.0, 0.5, 1.0, 2.5)
]
CASES += [
    dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, ld_alpha=0.6)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_losses_equal_trl_formulas(case, beta):
    settings = LossSettings(beta, **case)
    per_token, ref_per_token, mask, log_sum_sq = random_pairs(zlib.crc32(repr((case, beta)).encode()))
    wpo = log_sum_sq if settings.use_weighting else None
    expected, chosen_rewards, rejected_rewards = trl_dpo_loss(
        settings.loss_types,
        settings.weights,
        beta,
        settings.label_smoothing,
        per_token,
        ref_per_token,
        mask,
        ld_alpha=settings.ld_alpha if settings.ld_alpha != 1.0 else None,
        f_divergence=settings.f_divergence_type,
        f_coef=settings.f_alpha_divergence_coef,
        tau=settings.discopop_tau,
        log_sum_sq=wpo,
    )
    batch = our_batch(per_token, ref_per_token, mask, wpo)
    out = compute_loss(settings, batch)
    torch.testing.assert_close(out.losses.mean(), expected, rtol=1e-10, atol=1e-10)
    if settings.ld_alpha == 1.0:
        torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-12, atol=1e-12)
    # Always the whole responses' summed log-ratios (TRL's are LD-weighted under ld_alpha).
    torch.testing.assert_close(out.chosen_rewards, beta * (batch.policy_chosen - batch.ref_chosen))
    torch.testing.assert_close(out.rejected_rewards, beta * (batch.policy_rejected - batch.ref_rejected))


def test_ld_alpha_zero_masks_the_tail_and_one_is_dpo():
    per_token, ref_per_token, mask, _ = random_pairs(7)
    batch = our_batch(per_token, ref_per_token, mask)
    one = compute_loss(LossSettings(0.1, ld_alpha=1.0), batch)
    dpo = compute_loss(
        LossSettings(0.1),
        PairLogps(batch.policy_chosen, batch.policy_rejected, batch.ref_chosen, batch.ref_rejected),
    )
    torch.testing.assert_close(one.losses, dpo.losses)
    zero = compute_loss(LossSettings(0.1, ld_alpha=0.0), batch)
    shared_only = compute_loss(
        LossSettings(0.1),
        PairLogps(
            batch.policy_chosen_shared,
            batch.policy_rejected_shared,
            batch.ref_chosen_shared,
            batch.ref_rejected_shared,
        ),
    )
    torch.testing.assert_close(zero.losses, shared_only.losses)


# ---- TRL's CPOTrainer and ORPOTrainer ------------------------------------------------------


def trl_cpo_loss(loss_type, beta, eps, gamma, cpo_alpha, per_token, mask):
    """TRL 1.16 CPOTrainer (alpha = 0): get_batch_logps (average_log_prob for simpo), cpo_loss,
    then losses.mean() + cpo_alpha · nll, nll the cross-entropy over the chosen labels."""
    sums, counts = (per_token * mask).sum(1), mask.sum(1)
    logps = sums / counts if loss_type == "simpo" else sums
    chosen, rejected = logps.chunk(2)
    logits = chosen - rejected
    if loss_type == "simpo":
        logits = logits - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    chosen_mask = mask.chunk(2)[0].bool()
    nll = -per_token.chunk(2)[0][chosen_mask].mean()
    return losses.mean() + cpo_alpha * nll, beta * chosen, beta * rejected


def trl_orpo_loss(beta, per_token, mask):
    """TRL 1.16 ORPOTrainer: mean token log-probs, odds_ratio_loss, loss = nll - losses.mean()."""
    logps = (per_token * mask).sum(1) / mask.sum(1)
    chosen, rejected = logps.chunk(2)
    log1mexp = lambda x: torch.log(-torch.expm1(x))  # noqa: E731  (TRL's helper, same value)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = beta * F.logsigmoid(log_odds)
    nll = -per_token.chunk(2)[0][mask.chunk(2)[0].bool()].mean()
    return nll - losses.mean(), beta * chosen, beta * rejected


@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="simpo", simpo_gamma=0.5),
        dict(loss_type="simpo", simpo_gamma=1.4, label_smoothing=0.1),
        dict(loss_type="cpo"),
        dict(loss_type="cpo", cpo_alpha=0.0, label_smoothing=0.2),
        dict(loss_type="cpo", cpo_alpha=0.3),
        dict(loss_type="orpo"),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_reference_free_losses_equal_trl_formulas(case, beta):
    settings = LossSettings(beta, **case)
    per_token, _, mask, _ = random_pairs(zlib.crc32(repr((case, beta)).encode()))
    if settings.loss_type == "orpo":
        expected, chosen_rewards, rejected_rewards = trl_orpo_loss(beta, per_token, mask)
    else:
        expected, chosen_rewards, rejected_rewards = trl_cpo_loss(
            settings.loss_type,
            beta,
            settings.label_smoothing,
            settings.simpo_gamma,
            settings.cpo_alpha if settings.loss_type == "cpo" else 0.0,
            per_token,
            mask,
        )
    sums, counts = (per_token * mask).sum(1), mask.sum(1).long()
    out = compute_loss(settings, PairLogps(*sums.chunk(2), None, None, *counts.chunk(2)))
    torch.testing.assert_close(out.losses.mean(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-12, atol=1e-12)


def test_simpo_with_rpo_alpha_is_trl_cpo_simpo():
    """TRL's CPOConfig(loss_type="simpo") with its default cpo_alpha=1.0 (CPO-SimPO) is our
    `simpo` with rpo_alpha=1.0: the same chosen-NLL term."""
    per_token, _, mask, _ = random_pairs(11)
    expected, _, _ = trl_cpo_loss("simpo", 2.0, 0.0, 0.5, 1.0, per_token, mask)
    sums, counts = (per_token * mask).sum(1), mask.sum(1).long()
    out = compute_loss(
        LossSettings(2.0, "simpo", rpo_alpha=1.0), PairLogps(*sums.chunk(2), None, None, *counts.chunk(2))
    )
    torch.testing.assert_close(out.losses.mean(), expected, rtol=1e-10, atol=1e-10)
