"""Reference-free objectives (simpo, cpo, orpo) on hand-derived values and the papers' formulas.

Policy log-probs of the shared example: chosen (-10, -5, -20) over (2, 4, 4) tokens, rejected
(-12, -5, -8) over (4, 4, 2): mean token log-probs chosen (-5, -1.25, -5), rejected (-3, -1.25, -4).
sp(x) = softplus(x) = log(1 + e^x).
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_dpo.losses import cpo_loss, orpo_loss, preference_loss, simpo_loss
from lora_dpo.losses.reference_free import log1mexp

F64 = torch.float64
PC, PR = torch.tensor([-10.0, -5.0, -20.0], dtype=F64), torch.tensor([-12.0, -5.0, -8.0], dtype=F64)
NC, NR = torch.tensor([2, 4, 4]), torch.tensor([4, 4, 2])


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_simpo_hand_derived():
    """β = 2, γ = 1: logits = mean_w - mean_l - γ/β = (-2.5, -0.5, -1.5), β·logits = (-5, -1, -3):
    L = sp(5), sp(1), sp(3) = 5.0067153485, 1.3132616875, 3.0485873516.
    Rewards β·mean: chosen (-10, -2.5, -10), rejected (-6, -2.5, -8)."""
    out = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=1.0)
    close(out.losses, [5.0067153485, 1.3132616875, 3.0485873516])
    close(out.chosen_rewards, [-10.0, -2.5, -10.0])
    close(out.rejected_rewards, [-6.0, -2.5, -8.0])


def test_simpo_is_the_papers_formula():
    """Meng et al. 2024: L = -log σ(β/|yw|·log πθ(yw|x) - β/|yl|·log πθ(yl|x) - γ), written out."""
    gen = torch.Generator().manual_seed(3)
    pc, pr = -torch.rand(16, generator=gen, dtype=F64) * 40, -torch.rand(16, generator=gen, dtype=F64) * 40
    nc, nr = (torch.randint(1, 30, (16,), generator=gen).to(F64) for _ in range(2))
    beta, gamma = 2.5, 1.375
    expected = -torch.log(1 / (1 + torch.exp(-(beta / nc * pc - beta / nr * pr - gamma))))
    torch.testing.assert_close(
        simpo_loss(pc, pr, nc, nr, beta, gamma).losses, expected, rtol=1e-12, atol=1e-12
    )


def test_cpo_hand_derived():
    """β = 0.5, α = 0.5: the preference term on log πθ(yw) - log πθ(yl) = (2, 0, -12), β× = (1, 0, -6):
    sp(-1), ln 2, sp(6) = 0.3132616875, 0.6931471806, 6.0024756851; the NLL term shared out as
    α·B·(-log πθ(yw))/Σ|yw| = 0.5·3·(10, 5, 20)/10 = (1.5, 0.75, 3.0) (mean α·3.5).
    Rewards β·(summed log-prob): chosen (-5, -2.5, -10), rejected (-6, -2.5, -4)."""
    out = cpo_loss(PC, PR, NC, beta=0.5, cpo_alpha=0.5)
    close(out.losses, [1.8132616875, 1.4431471806, 9.0024756851])
    close(out.chosen_rewards, [-5.0, -2.5, -10.0])
    close(out.rejected_rewards, [-6.0, -2.5, -4.0])
    without_nll = cpo_loss(PC, PR, NC, beta=0.5, cpo_alpha=0.0)
    close(without_nll.losses, [0.3132616875, 0.6931471806, 6.0024756851])


def test_orpo_hand_derived():
    """λ = β = 0.5. Pair 1: chosen 2 tokens of log-prob log ½ (P = ½, odds 1), rejected 3 tokens
    of log ⅕ (P = ⅕, odds ¼): log OR = log 4, -log σ(log 4) = -log(4/5) = log 1.25 = 0.2231435513.
    Pair 2: chosen 1 token log ¼ (odds ⅓), rejected 2 tokens log ½ (odds 1): log OR = -log 3,
    -log σ(-log 3) = log 4 = 1.3862943611. The batch's chosen NLL per token:
    -(2 log ½ + log ¼)/3 = 4 ln 2/3 = 0.9241962407, and each pair's share α·B·(-log π)/Σ|yw| with α = 1:
    2·(2 ln 2)/3 = 0.9241962407 both. L = 0.9241962407 + 0.5·(0.2231435513, 1.3862943611)."""
    pc = torch.tensor([2 * math.log(0.5), math.log(0.25)], dtype=F64)
    pr = torch.tensor([3 * math.log(0.2), 2 * math.log(0.5)], dtype=F64)
    out = orpo_loss(pc, pr, torch.tensor([2, 1]), torch.tensor([3, 2]), beta=0.5)
    close(out.losses, [0.9241962407 + 0.5 * 0.2231435513, 0.9241962407 + 0.5 * 1.3862943611])
    close(out.chosen_rewards, [0.5 * math.log(0.5), 0.5 * math.log(0.25)])
    close(out.rejected_rewards, [0.5 * math.log(0.2), 0.5 * math.log(0.5)])


def test_orpo_is_the_papers_odds_ratio():
    """Hong et al. 2024, Eqs. 4 and 7 written with odds(y) = P/(1-P), P = exp(mean token log-prob)."""
    gen = torch.Generator().manual_seed(5)
    pc, pr = (
        -torch.rand(12, generator=gen, dtype=F64) * 20 - 0.01,
        -torch.rand(12, generator=gen, dtype=F64) * 20 - 0.01,
    )
    nc, nr = torch.randint(1, 10, (12,), generator=gen), torch.randint(1, 10, (12,), generator=gen)
    odds = lambda p: p / (1 - p)  # noqa: E731
    ratio = odds(torch.exp(pc / nc)) / odds(torch.exp(pr / nr))
    nll = -pc.sum() / nc.sum()
    expected = nll - 0.25 * torch.log(ratio / (1 + ratio))
    torch.testing.assert_close(
        orpo_loss(pc, pr, nc, nr, beta=0.25).losses.mean(), expected.mean(), rtol=1e-10, atol=1e-10
    )


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-10, -0.5, -math.log(2), -5.0, -50.0], dtype=F64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    close(log1mexp(x), expected, atol=1e-12)


def test_reference_free_losses_read_no_reference():
    """preference_loss with no reference values at all, as training passes them."""
    for loss_type in ("simpo", "cpo", "orpo"):
        out = preference_loss(
            PC, PR, None, None, 0.5, loss_type=loss_type, chosen_tokens=NC, rejected_tokens=NR
        )
        assert torch.isfinite(out.losses).all()
    with pytest.raises(ValueError, match="needs ref_chosen, ref_rejected"):
        preference_loss(PC, PR, None, None, 0.5, loss_type="sigmoid")
