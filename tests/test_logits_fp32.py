"""The fused LM head's logits in fp32 (lora_dpo.logps.fp32_linear), not rounded to bf16 first.

A bf16 matmul rounds its output: logits of magnitude ~20 move by up to 2^-9 * 32 = 0.06
before the fp32 log-softmax. On CUDA `torch.mm(..., out_dtype=torch.float32)` returns the
fp32 accumulator (documented for fp16/bf16 inputs on CUDA only: here it runs on the meta
device, shapes and dtypes only); on the CPU the weight is upcast once per call. Measured
against an fp64 computation from the same bf16 hidden states and weight, the rounded path's
log-probs are off by up to 1.7e-2 nats per token (4e-3 on average), the fp32 path's by at
most 1.5e-6 (bound: 1e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_dpo.logps import LogitHead, fp32_linear, has_fp32_output_mm, response_token_logps

HIDDEN, VOCAB, TOKENS = 64, 1000, 40
FP32_BOUND = 1e-4  # nats per token against fp64


def bf16_head(softcap: float | None = None, seed: int = 0):
    """A frozen bf16 head, hidden states and targets; logits of magnitude ~20."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) * 2.5 / HIDDEN**0.5)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    return LogitHead(linear, None, softcap), hidden, targets


def exact_logps(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor, rounded: bool = False):
    """fp64 log-probs of the same bf16 inputs; `rounded`: the logits rounded to bf16 first
    (the old path, F.linear in bf16 then .float())."""
    logits = hidden.double() @ head.module.weight.double().t()  # [N, V]
    if rounded:
        logits = F.linear(hidden, head.module.weight).double()
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcapped"])
def test_fp32_logits_are_closer_to_exact_than_rounded_ones(softcap):
    head, hidden, targets = bf16_head(softcap)
    assert head.frozen_linear  # the fused path
    exact = exact_logps(head, hidden, targets)
    assert exact.abs().mean() > 1.0  # far from uniform: the rounding matters
    ours = response_token_logps(head, hidden, targets, chunk_size=7)
    old = exact_logps(head, hidden, targets, rounded=True)  # what the head used to compute
    new_error = (ours.double() - exact).abs().max().item()
    old_error = (old - exact).abs().max().item()
    assert ours.dtype == torch.float32
    assert new_error < FP32_BOUND, new_error
    assert old_error > 1e-3 and new_error < old_error / 100, (new_error, old_error)


def test_values_do_not_depend_on_the_chunk_size():
    head, hidden, targets = bf16_head(seed=1)
    results = [response_token_logps(head, hidden, targets, chunk_size=size) for size in (1, 3, 7, 10_000)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-6)


def test_gradients_of_the_fused_head_follow_the_fp32_logits():
    """d log p[y] / d h = (onehot(y) - p) W, with p from the fp32 logits: against fp64 autograd."""
    head, hidden, targets = bf16_head(seed=2)
    hidden = hidden.requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, TOKENS)
    (response_token_logps(head, hidden, targets, chunk_size=6) * weights).sum().backward()
    exact_hidden = hidden.detach().double().requires_grad_(True)
    logits = exact_hidden @ head.module.weight.double().t()
    exact = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (exact * weights.double()).sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    scale = exact_hidden.grad.abs().max()
    assert ((hidden.grad.double() - exact_hidden.grad).abs().max() / scale) < 2e-2  # bf16 storage


def test_which_matmul_gives_the_fp32_logits():
    """CPU: no bf16 kernel with an fp32 output (documented as CUDA only), so the weight is
    upcast; fp32 weights take the plain matmul; a device with the kernel (meta: shapes and
    dtypes only) takes torch.mm with out_dtype, bias added in fp32."""
    assert not has_fp32_output_mm("cpu", torch.bfloat16)
    assert has_fp32_output_mm("meta", torch.bfloat16)
    for device in ("cpu", "meta"):
        weight = torch.ones(VOCAB, HIDDEN, dtype=torch.bfloat16, device=device)
        bias = torch.ones(VOCAB, dtype=torch.bfloat16, device=device)
        hidden = torch.ones(5, HIDDEN, dtype=torch.bfloat16, device=device)
        logits = fp32_linear(weight, bias)(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (5, VOCAB) and logits.device.type == device
    weight = torch.full((VOCAB, HIDDEN), 1 + 2**-7, dtype=torch.bfloat16)  # exact in bf16
    hidden = torch.full((2, HIDDEN), 1 + 2**-7, dtype=torch.bfloat16)
    expected = HIDDEN * (1 + 2**-7) ** 2  # 64.98..., which bf16 would round to 65
    assert torch.equal(fp32_linear(weight, None)(hidden), torch.full((2, VOCAB), expected))
    assert F.linear(hidden, weight).float()[0, 0] == 65.0  # what the rounded path gave
    fp32 = torch.randn(VOCAB, HIDDEN)
    x = torch.randn(3, HIDDEN)
    assert torch.equal(fp32_linear(fp32, None)(x), F.linear(x, fp32))
