import math

import torch

from lora_dpo.losses import dpo_loss


def test_hand_derived_values():
    """Three pairs, β = 0.5. With Δw = πθ(yw) - πref(yw) and Δl likewise, z = β(Δw - Δl):

    pair 1: policy (-10, -12), ref (-11, -11): Δw = 1,  Δl = -1, z = 0.5·2 = 1
            loss = log(1 + e^-1) = 0.3132616875;  rewards: 0.5, -0.5
    pair 2: policy (-5, -5),   ref (-5, -5):   Δw = 0,  Δl = 0,  z = 0
            loss = log 2 = 0.6931471806;          rewards: 0, 0
    pair 3: policy (-20, -8),  ref (-16, -10): Δw = -4, Δl = 2,  z = 0.5·(-6) = -3
            loss = log(1 + e^3) = 3.0485873516;   rewards: -2, 1
    """
    out = dpo_loss(
        policy_chosen=torch.tensor([-10.0, -5.0, -20.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-12.0, -5.0, -8.0], dtype=torch.float64),
        ref_chosen=torch.tensor([-11.0, -5.0, -16.0], dtype=torch.float64),
        ref_rejected=torch.tensor([-11.0, -5.0, -10.0], dtype=torch.float64),
        beta=0.5,
    )
    expected = torch.tensor([0.3132616875, 0.6931471806, 3.0485873516], dtype=torch.float64)
    torch.testing.assert_close(out.losses, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.0, 1.0], dtype=torch.float64))


def test_policy_equal_to_reference_gives_exactly_ln2():
    logps = torch.randn(16) * 50
    other = torch.randn(16) * 50
    for beta in (0.01, 0.1, 1.0, 10.0):
        out = dpo_loss(logps, other, logps.clone(), other.clone(), beta)
        assert torch.all(out.losses == torch.tensor(math.log(2.0)))
        assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_gradient_matches_closed_form():
    """dL/d(policy_chosen) = -β·σ(-z): the DPO gradient weight (paper, Eq. 8)."""
    policy_chosen = torch.tensor([-3.0, -7.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -2.0], requires_grad=True)
    ref = torch.tensor([-3.5, -3.5])
    beta = 0.2
    out = dpo_loss(policy_chosen, policy_rejected, ref, ref, beta)
    out.losses.sum().backward()
    z = beta * ((policy_chosen - ref) - (policy_rejected - ref)).detach()
    torch.testing.assert_close(policy_chosen.grad, -beta * torch.sigmoid(-z))
    torch.testing.assert_close(policy_rejected.grad, beta * torch.sigmoid(-z))


def test_large_margins_stay_finite():
    big = torch.tensor([1e4, -1e4])
    out = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(out.losses).all()
    assert out.losses[0] == 0 and out.losses[1] == 2e4
