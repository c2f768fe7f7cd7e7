"""A bf16 model's decoder runs under bf16 autocast (lora_dpo.logps.decoder_autocast): the LoRA
branch computes in bf16 from fp32 master weights, the head and the log-softmax stay in fp32.

On the CPU (bf16 autocast exists there too), through a real 4-bit base (bitsandbytes' layer,
peft's bnb LoRA layer) and a plain bf16 base (peft's nn.Linear LoRA layer), LoRA B moved off
zero so the adapter changes the values by about 1 nat per sequence:
- log-probs under autocast equal those of the fp32 LoRA branch (no autocast) within 5e-3 nats
  per response token (measured: at most 1.0e-3 for the 4-bit base, 5e-4 for the plain one) and
  within 5% of the adapter's own effect on them, so an adapter dropped under autocast fails;
- the tensors autograd saves inside the LoRA A and B matmuls are bf16 under autocast, fp32
  without it (the memory claim), and LoRA gradients are fp32;
- the untrained policy (B = 0) equals a reference scored through the same function bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lora_dpo.logps as logps_module
from lora_dpo.batching import collate, pad_id_of
from lora_dpo.logps import sequence_logps
from lora_dpo.scoring import score_pairs
from policies import move_lora_b_off_zero

CPU = torch.device("cpu")
PER_TOKEN_GAP = 5e-3  # nats per response token, autocast vs the fp32 LoRA branch


@pytest.fixture(scope="module")
def demo(demo_workdir):
    from lora_dpo.data import load_preference_data
    from lora_dpo.demo import demo_config
    from lora_dpo.model import load_tokenizer

    config = demo_config(demo_workdir)
    tokenizer = load_tokenizer(config.model)
    pairs = load_preference_data(config.data, tokenizer, "train")[0][:6]
    return config, pairs, pad_id_of(tokenizer)


def bf16_policy(demo, quantize: bool, *, trained: bool = True, gradient_checkpointing: bool = True):
    """(policy, the reference's scores of the pairs before LoRA was attached)."""
    from lora_dpo.model import attach_lora, load_base_model

    config, pairs, pad_id = demo
    base = load_base_model(config.model, quantize=quantize, dtype=torch.bfloat16, device=CPU)
    reference = score_pairs(base, pairs, batch_size=len(pairs), pad_id=pad_id, device=CPU)
    torch.manual_seed(0)
    policy = attach_lora(base, config.lora, gradient_checkpointing=gradient_checkpointing)
    if trained:
        move_lora_b_off_zero(policy)
    policy.train()
    return policy, reference


@contextlib.contextmanager
def without_autocast(monkeypatch):
    """The path before autocast: peft casts each LoRA input to fp32 and computes the branch there."""
    with monkeypatch.context() as patch:
        patch.setattr(logps_module, "decoder_autocast", lambda model, device: contextlib.nullcontext())
        yield


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "bf16"])
def test_autocast_values_equal_the_fp32_lora_branch(demo, monkeypatch, quantize):
    policy, reference = bf16_policy(demo, quantize)
    batch = collate(demo[1], demo[2])
    assert isinstance(logps_module.decoder_autocast(policy, CPU), torch.autocast)
    with torch.no_grad():
        autocast = sequence_logps(policy, batch)
        with without_autocast(monkeypatch):
            fp32_branch = sequence_logps(policy, batch)
    gap = (autocast.logps - fp32_branch.logps).abs()  # [2B]
    adapter_effect = (fp32_branch.logps - torch.cat([reference.chosen, reference.rejected])).abs()
    assert autocast.logps.dtype == torch.float32
    assert (gap / batch.tokens).max() < PER_TOKEN_GAP, gap / batch.tokens
    assert gap.max() < 0.05 * adapter_effect.max() and adapter_effect.max() > 0.5


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "bf16"])
def test_lora_matmuls_save_bf16_and_gradients_are_fp32(demo, monkeypatch, quantize):
    """Saved tensors seen while a LoRA A or B module runs (checkpointing off, so the outer hooks
    see inside the layers; with it, the recompute saves the same tensors in backward)."""
    policy, _ = bf16_policy(demo, quantize, gradient_checkpointing=False)
    batch = collate(demo[1], demo[2])
    lora_modules = [m for n, m in policy.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora_modules
    inside: list[torch.nn.Module] = []
    saved: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if inside and tensor.is_floating_point() and not isinstance(tensor, torch.nn.Parameter):
            saved.append(tensor.dtype)
        return tensor

    handles = [m.register_forward_pre_hook(lambda m, a: inside.append(m)) for m in lora_modules]
    handles += [m.register_forward_hook(lambda m, a, o: inside.remove(m)) for m in lora_modules]
    try:
        for autocast in (True, False):
            saved.clear()
            with contextlib.ExitStack() as stack:
                if not autocast:
                    stack.enter_context(without_autocast(monkeypatch))
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    out = sequence_logps(policy, batch)
            out.logps.sum().backward()
            expected = torch.bfloat16 if autocast else torch.float32
            assert saved and set(saved) == {expected}, (autocast, set(saved))
            grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
            assert grads and all(g is not None and g.dtype == torch.float32 for g in grads.values())
            assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
            assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
            policy.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("head_path", ["fused", "checkpointed"])
def test_the_head_and_log_softmax_run_outside_autocast(demo, head_path):
    """Every call that reads the LM head's weight (forward and backward, either head path)
    runs with autocast off; the decoder's layers run with it on."""
    from torch.overrides import TorchFunctionMode

    policy, _ = bf16_policy(demo, quantize=True)
    head = policy.get_output_embeddings()
    states: dict[str, set[bool]] = {"head": set(), "layer": set()}

    class HeadCalls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if any(arg is head.weight for arg in (*args, *(kwargs or {}).values())):
                states["head"].add(torch.is_autocast_enabled("cpu"))
            return func(*args, **(kwargs or {}))

    layer = policy.get_base_model().model.layers[0]
    hook = layer.register_forward_hook(lambda *_: states["layer"].add(torch.is_autocast_enabled("cpu")))
    head.requires_grad_(head_path == "checkpointed")
    try:
        assert logps_module.causal_lm_parts(policy)[1].frozen_linear == (head_path == "fused")
        with HeadCalls():
            out = sequence_logps(policy, collate(demo[1], demo[2]), chunk_size=4)
            out.logps.sum().backward()
    finally:
        head.requires_grad_(False)
        hook.remove()
    assert states == {"head": {False}, "layer": {True}}
    assert out.logps.dtype == torch.float32


def test_gradient_checkpointing_recomputes_under_the_same_autocast(demo):
    """Non-reentrant checkpointing restores the autocast state in the recompute: the same
    values and the same LoRA gradients as without checkpointing."""
    results = []
    for checkpointing in (True, False):
        policy, _ = bf16_policy(demo, quantize=True, gradient_checkpointing=checkpointing)
        out = sequence_logps(policy, collate(demo[1], demo[2]))
        out.logps.sum().backward()
        grads = [p.grad for n, p in sorted(policy.named_parameters()) if p.requires_grad]
        results.append((out.logps.detach(), grads))
    (values, grads), (plain_values, plain_grads) = results
    torch.testing.assert_close(values, plain_values, rtol=0, atol=0)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_untrained_policy_equals_the_reference_bit_for_bit(demo):
    """Precompute scores the bare base through sequence_logps too, so under the same autocast:
    with B = 0 the LoRA branch adds exact zeros, and step 0 has no gap at all."""
    policy, reference = bf16_policy(demo, quantize=True, trained=False)
    with torch.no_grad():
        untrained = sequence_logps(policy, collate(demo[1], demo[2]))
    assert torch.equal(untrained.chosen, reference.chosen)
    assert torch.equal(untrained.rejected, reference.rejected)
