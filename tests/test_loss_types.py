"""TRL's loss types beyond sigmoid/ipo/hinge/robust, and the options around them, on
hand-derived values.

The shared three-pair example (β = 0.5), with Δw = πθ(yw) - πref(yw), Δl likewise, z = Δw - Δl
and the rewards rw = βΔw, rl = βΔl:

    pair 1: policy (-10, -12), ref (-11, -11): Δw = 1,  Δl = -1, z = 2,  βz = 1,  rw = 0.5, rl = -0.5
    pair 2: policy (-5, -5),   ref (-5, -5):   Δw = 0,  Δl = 0,  z = 0,  βz = 0,  rw = 0,   rl = 0
    pair 3: policy (-20, -8),  ref (-16, -10): Δw = -4, Δl = 2,  z = -6, βz = -3, rw = -2,  rl = 1

Token counts chosen (2, 4, 4), rejected (4, 4, 2). sp(x) = softplus(x) = log(1 + e^x) = -log σ(-x):
sp(±0.5) = 0.9740769842 / 0.4740769842, sp(±1) = 1.3132616875 / 0.3132616875,
sp(2) = 2.1269280110, sp(-2) = 0.1269280110, sp(3) = 3.0485873516, sp(0) = ln 2;
σ(0.5) = 0.6224593312, σ(1) = 0.7310585786, σ(2) = 0.8807970780, σ(3) = 0.9525741268.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_dpo.losses import (
    FDivergence,
    LossSettings,
    PairLogps,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    compute_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    ld_logps,
    nca_pair_loss,
    preference_loss,
    sft_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
    wpo_weights,
)

F64 = torch.float64


def example():
    return dict(
        policy_chosen=torch.tensor([-10.0, -5.0, -20.0], dtype=F64),
        policy_rejected=torch.tensor([-12.0, -5.0, -8.0], dtype=F64),
        ref_chosen=torch.tensor([-11.0, -5.0, -16.0], dtype=F64),
        ref_rejected=torch.tensor([-11.0, -5.0, -10.0], dtype=F64),
    )


CHOSEN_TOKENS, REJECTED_TOKENS = torch.tensor([2, 4, 4]), torch.tensor([4, 4, 2])
REWARDS = ([0.5, 0.0, -2.0], [-0.5, 0.0, 1.0])  # β·Δ, the same for every loss type


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def assert_rewards(out):
    close(out.chosen_rewards, REWARDS[0])
    close(out.rejected_rewards, REWARDS[1])


def test_nca_pair_hand_derived():
    """L = sp(-rw) + ½·sp(rw) + ½·sp(rl)
    pair 1: 1.5·sp(-0.5) + 0.5·sp(0.5) = 0.7111154763 + 0.4870384921 = 1.1981539684
    pair 2: 2·ln 2 = 1.3862943611
    pair 3: sp(2) + ½·sp(-2) + ½·sp(1) = 2.1269280110 + 0.0634640055 + 0.6566308438 = 2.8470228603"""
    out = nca_pair_loss(**example(), beta=0.5)
    close(out.losses, [1.1981539684, 1.3862943611, 2.8470228603])
    assert_rewards(out)


def test_bco_pair_hand_derived():
    """L = sp(-rw) + sp(rl): pair 1: 2·sp(-0.5) = 0.9481539684; pair 2: 2 ln 2;
    pair 3: sp(2) + sp(1) = 3.4401896985"""
    out = bco_pair_loss(**example(), beta=0.5)
    close(out.losses, [0.9481539684, 1.3862943611, 3.4401896985])
    assert_rewards(out)


def test_sppo_hard_hand_derived():
    """1/(2β) = 1: L = (Δw - 1)² + (Δl + 1)²: pair 1: 0 + 0; pair 2: 1 + 1; pair 3: 25 + 9."""
    out = sppo_hard_loss(**example(), beta=0.5)
    close(out.losses, [0.0, 2.0, 34.0])
    assert_rewards(out)


def test_apo_hand_derived():
    """apo_zero: L = 1 - σ(rw) + σ(rl)
        pair 1: 1 - σ(0.5) + σ(-0.5) = 2·(1 - 0.6224593312) = 0.7550813376; pair 2: 1
        pair 3: 1 - σ(-2) + σ(1) = 1 - 0.1192029220 + 0.7310585786 = 1.6118556566
    apo_down: L = σ(rw) + 1 - σ(rw - rl)
        pair 1: σ(0.5) + 1 - σ(1) = 0.6224593312 + 1 - 0.7310585786 = 0.8914007526; pair 2: 1
        pair 3: σ(-2) + 1 - σ(-3) = 0.1192029220 + 1 - 0.0474258732 = 1.0717770488"""
    zero, down = apo_zero_loss(**example(), beta=0.5), apo_down_loss(**example(), beta=0.5)
    close(zero.losses, [0.7550813376, 1.0, 1.6118556566])
    close(down.losses, [0.8914007526, 1.0, 1.0717770488])
    assert_rewards(zero)
    assert_rewards(down)


def test_exo_pair_hand_derived():
    """ε = 0.1, q = σ(βz): L = q·(log q - log 0.9) + (1-q)·(log(1-q) - log 0.1)
    pair 2: q = ½: log ½ - ½·log 0.09 = -0.6931471806 + 1.2039728043 = 0.5108256237
    pair 1: q = σ(1) = 0.7310585786: 0.7310585786·(-0.3132616875 + 0.1053605157)
            + 0.2689414214·(-1.3132616875 + 2.3025850930) = -0.1519879 + 0.2660700 = 0.1140821
    The loss is smallest where q matches the labels' 0.9, not at q -> 1 as DPO's."""
    out = exo_pair_loss(**example(), beta=0.5, label_smoothing=0.1)
    close(out.losses[1:2], [0.5108256238])
    q = 1 / (1 + math.exp(-1))
    expected_1 = q * (math.log(q) - math.log(0.9)) + (1 - q) * (math.log(1 - q) - math.log(0.1))
    assert out.losses[0].item() == pytest.approx(expected_1, abs=1e-12)
    assert out.losses[0].item() == pytest.approx(0.1140821077, abs=1e-9)
    assert_rewards(out)
    # Its minimum, 0, lies at q = 1 - ε: βz = log(0.9 / 0.1).
    at_target = exo_pair_loss(
        torch.tensor([math.log(9.0)], dtype=F64),
        torch.zeros(1, dtype=F64),
        torch.zeros(1, dtype=F64),
        torch.zeros(1, dtype=F64),
        beta=1.0,
        label_smoothing=0.1,
    )
    close(at_target.losses, [0.0], atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(**example(), beta=0.5, label_smoothing=0.0)


def test_discopop_hand_derived():
    """τ = 0.05, ρ = βz, m = σ(ρ/τ): L = (1-m)·sp(-ρ) + m·e^-ρ
    pair 2: ρ = 0, m = ½: ½ ln 2 + ½ = 0.8465735903
    pair 1: ρ = 1, m = σ(20) = 1 - 2.06e-9: e^-1 - 2.06e-9·(e^-1 - sp(-1)) = 0.3678794411
    pair 3: ρ = -3, m = σ(-60) = 8.8e-27: sp(3) + 8.8e-27·e^3 = 3.0485873516"""
    out = discopop_loss(**example(), beta=0.5, tau=0.05)
    close(out.losses, [0.3678794411, 0.8465735903, 3.0485873516])
    assert_rewards(out)
    huge = discopop_loss(torch.tensor([-1e4]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0)
    assert huge.losses.item() == pytest.approx(1e4)  # the logistic side, no inf * 0


def test_sigmoid_norm_hand_derived():
    """h = Δw/|yw| - Δl/|yl| = (0.75, 0, -2); L = sp(-βh): sp(-0.375) = 0.5231232641, ln 2, sp(1)."""
    out = sigmoid_norm_loss(
        **example(), beta=0.5, chosen_tokens=CHOSEN_TOKENS, rejected_tokens=REJECTED_TOKENS
    )
    close(out.losses, [0.5231232641, 0.6931471806, 1.3132616875])
    assert_rewards(out)


def test_aot_hand_derived():
    """aot: policy log-ratios πθ(yw) - πθ(yl) = (2, 0, -12), sorted (-12, 0, 2); the reference's
    (0, 0, -6), sorted (-6, 0, 0); δ = (-6, 0, 2), βδ = (-3, 0, 1): L = (sp(3), ln 2, sp(-1)).
    aot_unpaired: Δw sorted (-4, 0, 1), Δl sorted (-1, 0, 2); δ = (-3, 0, -1), βδ = (-1.5, 0, -0.5):
    L = (sp(1.5), ln 2, sp(0.5)) = (1.7014132779, 0.6931471806, 0.9740769842). The rewards stay per pair."""
    paired, unpaired = aot_loss(**example(), beta=0.5), aot_unpaired_loss(**example(), beta=0.5)
    close(paired.losses, [3.0485873516, 0.6931471806, 0.3132616875])
    close(unpaired.losses, [1.7014132779, 0.6931471806, 0.9740769842])
    assert_rewards(paired)
    assert_rewards(unpaired)
    smoothed = aot_loss(**example(), beta=0.5, label_smoothing=0.1)  # + ε·βδ, as cDPO
    close(smoothed.losses, [3.0485873516 - 0.3, 0.6931471806, 0.3132616875 + 0.1])


def test_sft_hand_derived():
    """The batch's chosen NLL per token, 35/10 = 3.5, for every pair."""
    out = sft_loss(**example(), beta=0.5, chosen_tokens=CHOSEN_TOKENS)
    close(out.losses, [3.5, 3.5, 3.5])
    assert_rewards(out)


def test_weighted_multi_loss_mpo_hand_derived():
    """sigmoid+bco_pair+sft with weights (0.8, 0.2, 1.0), as MPO:
    pair 1: 0.8·0.3132616875 + 0.2·0.9481539684 + 3.5 = 3.9402401437
    pair 2: 0.8·ln 2 + 0.2·2 ln 2 + 3.5 = 4.3317766167
    pair 3: 0.8·3.0485873516 + 0.2·3.4401896985 + 3.5 = 6.6269078210"""
    out = preference_loss(
        **example(),
        beta=0.5,
        loss_type="sigmoid+bco_pair+sft",
        loss_weights=(0.8, 0.2, 1.0),
        chosen_tokens=CHOSEN_TOKENS,
        rejected_tokens=REJECTED_TOKENS,
    )
    close(out.losses, [3.9402401437, 4.3317766167, 6.6269078210])
    assert_rewards(out)
    unweighted = preference_loss(**example(), beta=0.5, loss_type="sigmoid+hinge")
    close(unweighted.losses, [0.3132616875 + 0.0, 0.6931471806 + 1.0, 3.0485873516 + 4.0])


def test_f_divergences_hand_derived():
    """The sigmoid loss on d = f'(e^Δw) - f'(e^Δl), Δw = (1, 0, -4), Δl = (-1, 0, 2), β = 0.5:
    forward KL, f' = 1 - e^-Δ: d = (e - e^-1, 0, e^-2 - e^4) = (2.3504023873, 0, -54.4628147499)
        L = sp(-βd) = (0.2690777199, ln 2, 27.2314073750)
    JS, f' = log 2 + log σ(Δ): d = (log σ(1) - log σ(-1), 0, log σ(-4) - log σ(2)) = (1, 0, -3.8912219169)
        (log σ(x) - log σ(-x) = x);  L = (sp(-0.5), ln 2, 2.0791797548)
    α-divergence a = 0.5, f' = (e^(-Δ/2) - 1)/(-1/2) = 2(1 - e^(-Δ/2)):
        d = 2(e^½ - e^-½, 0, e^-1 - e^2) = (2.0843812220, 0, -14.0423533155), L = (0.3020887322, ln 2, 7.0220690339)
    and a = 1 is reverse KL, a = 0 forward KL (TRL's coefficient is 1 - the paper's α)."""
    cases = {
        FDivergence("forward_kl"): [0.2690777199, 0.6931471806, 27.2314073750],
        FDivergence("js_divergence"): [0.4740769842, 0.6931471806, 2.0791797548],
        FDivergence("alpha_divergence", 0.5): [0.3020887322, 0.6931471806, 7.0220690339],
    }
    for divergence, expected in cases.items():
        out = dpo_loss(**example(), beta=0.5, divergence=divergence)
        close(out.losses, expected)
        assert_rewards(out)  # the rewards stay β·Δ
    reverse = dpo_loss(**example(), beta=0.5).losses
    torch.testing.assert_close(
        dpo_loss(**example(), beta=0.5, divergence=FDivergence("alpha_divergence", 1.0)).losses, reverse
    )
    torch.testing.assert_close(
        dpo_loss(**example(), beta=0.5, divergence=FDivergence("alpha_divergence", 0.0)).losses,
        dpo_loss(**example(), beta=0.5, divergence=FDivergence("forward_kl")).losses,
    )


def test_ld_dpo_hand_derived():
    """One pair, β = 1, α = 0.5. Policy tokens: chosen (-1, -2, -3), rejected (-4, -1); the
    shared length is min(3, 2) = 2. Reference tokens: chosen (-1, -1, -1), rejected (-2, -2).
    policy chosen: shared -3, total -6 -> -3 + 0.5·(-3) = -4.5;  rejected: shared = total = -5
    ref chosen: shared -2, total -3 -> -2.5;                      rejected: -4
    Δw = -4.5 + 2.5 = -2, Δl = -5 + 4 = -1, z = -1: L = sp(1) = 1.3132616875.
    The rewards are the whole responses': Δw = -6 + 3 = -3, Δl = -1."""
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    close(ld_logps(t(-6.0), t(-3.0), 0.5), [-4.5])
    batch = PairLogps(
        t(-6.0),
        t(-5.0),
        t(-3.0),
        t(-4.0),
        torch.tensor([3]),
        torch.tensor([2]),
        policy_chosen_shared=t(-3.0),
        policy_rejected_shared=t(-5.0),
        ref_chosen_shared=t(-2.0),
        ref_rejected_shared=t(-4.0),
    )
    out = compute_loss(LossSettings(1.0, ld_alpha=0.5), batch)
    close(out.losses, [1.3132616875])
    close(out.chosen_rewards, [-3.0])
    close(out.rejected_rewards, [-1.0])
    plain = compute_loss(LossSettings(1.0, ld_alpha=1.0), batch)  # α = 1: DPO on the whole responses
    close(plain.losses, [math.log1p(math.exp(2.0))])
    with pytest.raises(ValueError, match="ld_alpha=0.5 needs policy_chosen_shared"):
        compute_loss(LossSettings(1.0, ld_alpha=0.5), PairLogps(t(-6.0), t(-5.0), t(-3.0), t(-4.0)))


def test_wpo_hand_derived():
    """Policy = reference (z = 0, sigmoid loss ln 2). Chosen: log-prob -2 over 2 tokens, Σ log Σp²
    = -1; rejected: -3 over 3 tokens, Σ log Σp² = -1.5. weight = exp((-2+1)/2 + (-3+1.5)/3)
    = exp(-1): L = e^-1·ln 2 = 0.2549945974. The weight carries no gradient."""
    t = lambda *v: torch.tensor(v, dtype=F64, requires_grad=True)  # noqa: E731
    pc, pr = t(-2.0), t(-3.0)
    weights = wpo_weights(pc, pr, t(-1.0), t(-1.5), torch.tensor([2]), torch.tensor([3]))
    close(weights, [math.exp(-1)])
    assert not weights.requires_grad
    batch = PairLogps(
        pc,
        pr,
        pc.detach().clone(),
        pr.detach().clone(),
        torch.tensor([2]),
        torch.tensor([3]),
        chosen_log_sum_sq=torch.tensor([-1.0], dtype=F64),
        rejected_log_sum_sq=torch.tensor([-1.5], dtype=F64),
    )
    out = compute_loss(LossSettings(0.5, use_weighting=True), batch)
    close(out.losses.detach(), [0.2549945974])
    out.losses.sum().backward()
    close(pc.grad, [-0.5 * 0.5 * math.exp(-1)])  # e^-1 · dL/dpc of DPO at z = 0: -β·σ(0)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss_type="dpo"), "must be one of sigmoid, ipo"),
        (dict(loss_type="sigmoid+simpo"), "stand alone"),
        (dict(loss_type="sigmoid+sft", loss_weights=(1.0,)), "one weight per loss type"),
        (dict(loss_type="exo_pair"), "needs label_smoothing > 0"),
        (dict(loss_type="ipo", label_smoothing=0.1), "has no effect with loss_type=ipo"),
        (dict(loss_type="sigmoid", discopop_tau=0.1), "discopop_tau=0.1 has no effect"),
        (
            dict(loss_type="bco_pair", f_divergence_type="js_divergence"),
            "does not apply to loss_type=bco_pair",
        ),
        (dict(loss_type="aot", use_weighting=True), "sort the batch"),
        (
            dict(f_divergence_type="js_divergence", f_alpha_divergence_coef=0.3),
            "no effect unless f_divergence_type=alpha",
        ),
        (dict(loss_type="simpo", ld_alpha=0.5), "has no reference"),
        (dict(loss_type="orpo", rpo_alpha=1.0), "holds the NLL term"),
        (dict(loss_type="cpo", rpo_alpha=1.0), "cpo_alpha weighs"),
    ],
)
def test_settings_that_cannot_run_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(
            **example(), beta=0.5, chosen_tokens=CHOSEN_TOKENS, rejected_tokens=REJECTED_TOKENS, **settings
        )


@pytest.mark.parametrize(
    "loss_type",
    [
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "apo_zero",
        "apo_down",
        "aot",
        "aot_unpaired",
        "discopop",
        "sigmoid_norm",
        "sft",
    ],
)
def test_gradients_are_finite_at_large_margins(loss_type):
    big = torch.tensor([1e3, -1e3, 0.0], dtype=torch.float32, requires_grad=True)
    out = preference_loss(
        big,
        -big,
        torch.zeros(3),
        torch.zeros(3),
        1.0,
        loss_type=loss_type,
        chosen_tokens=torch.tensor([3, 3, 3]),
        rejected_tokens=torch.tensor([3, 3, 3]),
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(big.grad).all(), loss_type
