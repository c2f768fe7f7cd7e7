"""Dropout16, the LoRA dropout whose CPU mask comes from 16-bit draws: its drop rate (overall,
per 16-bit lane of a word, and between neighbours), its exact scale and gradient, checkpoint
replay, the bool mask backward keeps, and that every policy the trainer builds uses it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_dpo.dropout import DRAWS, INT16_MIN, Dropout16, drop_threshold, keep_mask

N = 2**20


def within(observed: float, expected: float, count: int, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / count)


def lane_rates(dropped: torch.Tensor) -> list[float]:
    """The drop rate of each of the four 16-bit lanes of the 64-bit words."""
    return [dropped.view(-1, 4)[:, lane].float().mean().item() for lane in range(4)]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_drop_rate_is_p_in_every_lane_and_neighbours_are_independent(p):
    torch.manual_seed(0)
    rate = drop_threshold(p) / DRAWS
    assert abs(rate - p) <= 2**-17
    dropped = Dropout16(p)(torch.ones(N)) == 0
    assert within(dropped.float().mean().item(), rate, N)
    for lane in lane_rates(dropped):
        assert within(lane, rate, N // 4)
    both = (dropped[:-1] & dropped[1:]).float().mean().item()  # neighbours, within and across words
    assert within(both, rate * rate, N - 1)


def test_a_word_drawn_without_its_top_bit_fails_the_lane_check():
    """The control: `random_()` without the full 64-bit range leaves each word's top bit 0,
    so the fourth lane's draws are never negative and, the drop values being the lowest,
    that lane never drops."""
    torch.manual_seed(0)
    k = drop_threshold(0.1)
    words = torch.empty(N // 4, dtype=torch.int64).random_()  # [0, 2**63): the top bit never set
    dropped = words.view(torch.int16).lt(INT16_MIN + k)
    rates = lane_rates(dropped)
    assert all(within(r, k / DRAWS, N // 4) for r in rates[:3])
    assert rates[3] == 0.0


def test_kept_elements_are_scaled_by_one_over_the_keep_rate_exactly():
    torch.manual_seed(1)
    x = torch.randn(512, 384)
    out = Dropout16(0.05)(x)
    k = drop_threshold(0.05)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (DRAWS / (DRAWS - k)))
    # unbiased: the mean over 400 draws of one input is the input, within 5 sigma per element
    torch.manual_seed(2)
    ones = torch.ones(4096)
    mean = torch.stack([Dropout16(0.05)(ones) for _ in range(400)]).mean(0)
    sigma = math.sqrt((k / DRAWS) / (1 - k / DRAWS) / 400)
    assert (mean - 1).abs().max() <= 5 * sigma + 1e-6
    assert abs(mean.mean().item() - 1) <= 5 * sigma / 64


def test_the_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(3)
    x = torch.randn(64, 96, requires_grad=True)
    grad_out = torch.randn(64, 96)
    out = Dropout16(0.2)(x)
    out.backward(grad_out)
    k = drop_threshold(0.2)
    assert torch.equal(x.grad, torch.where(out != 0, grad_out, 0.0) * (DRAWS / (DRAWS - k)))


def test_checkpointing_replays_the_same_masks():
    layer = torch.nn.Sequential(Dropout16(0.1), torch.nn.Linear(64, 64), Dropout16(0.1))
    x = torch.randn(32, 64)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        torch.manual_seed(4)
        inp = x.clone().requires_grad_()
        out = checkpoint(layer, inp, use_reentrant=False) if checkpointed else layer(inp)
        out.pow(2).sum().backward()
        return [inp.grad, *(p.grad for p in layer.parameters())]

    plain, replayed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed, strict=True))


def saved_bytes(fn, x: torch.Tensor) -> list[tuple[torch.dtype, int]]:
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def test_backward_keeps_a_bool_mask_where_torch_keeps_fp32_noise():
    x = torch.randn(100, 64, requires_grad=True)
    assert saved_bytes(Dropout16(0.05), x) == [(torch.bool, x.numel())]
    assert saved_bytes(lambda t: F.dropout(t, 0.05, training=True), x) == [(torch.float32, x.numel())]


def test_eval_zero_p_and_unrepresentable_p():
    x = torch.randn(16, 8)
    module = Dropout16(0.3).eval()
    assert module(x) is x
    assert Dropout16(0.0)(x) is x
    assert torch.equal(Dropout16(1.0)(x), torch.zeros_like(x))
    torch.manual_seed(5)
    tiny = Dropout16(1e-6)(x)  # below 2**-17: 16-bit draws cannot drop that rarely; torch's own
    torch.manual_seed(5)
    assert torch.equal(tiny, F.dropout(x, 1e-6, training=True))


def test_a_seed_fixes_the_masks_and_calls_differ():
    x = torch.ones(4096)
    torch.manual_seed(6)
    first, second = Dropout16(0.1)(x), Dropout16(0.1)(x)
    torch.manual_seed(6)
    assert torch.equal(Dropout16(0.1)(x), first)
    assert not torch.equal(first, second)


def test_keep_mask_has_the_shape_for_any_element_count():
    for shape in [(1,), (3,), (5, 7), (2, 3, 5)]:
        assert keep_mask(torch.Size(shape), drop_threshold(0.5)).shape == shape


def test_every_policy_the_trainer_builds_uses_it(demo_workdir):
    from peft.tuners.lora import LoraLayer

    from lora_dpo.demo import demo_config
    from lora_dpo.model import build_policy, load_base_model

    config = demo_config(demo_workdir)
    config.lora.dropout = 0.05  # the demo trains without dropout
    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=torch.device("cpu"))
    policy = build_policy(base, config, gradient_checkpointing=True)
    dropouts = [d for m in policy.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is Dropout16 and d.p == config.lora.dropout for d in dropouts)
