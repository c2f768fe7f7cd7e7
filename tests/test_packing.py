"""Packed rows (several pairs to a row, the prompt once, no padding) against the padded
computation: values and gradients on Llama, Qwen2, Mistral and Gemma 2, eager and sdpa, with
sliding windows shorter than a row, through each attention backend (dense masks, pair by
pair, FlexAttention's mask_mod and, forward only, FlexAttention itself on the CPU) and through
the 4-bit LoRA policy; the layout choice; scoring by token budget.

Tolerances are those of tests/test_logps.py: fp32 within 1e-5 relative (atol 1e-4 on sums of
~-100); bf16 rtol 2e-2, atol 2e-1, gradients scaled by their largest entry.
"""

from __future__ import annotations

import pytest
import torch
from test_logps import SLIDING, TOLERANCE, assert_grads_close, make_model, random_pairs, weighted_sum

from lora_dpo.attention import PAIRWISE, mask_mod, prepare_packed_attention
from lora_dpo.batching import collate, collate_packed, collate_prompt_shared, packed_length
from lora_dpo.data import TokenizedPair
from lora_dpo.demo.models import ARCHITECTURES
from lora_dpo.errors import ConfigError
from lora_dpo.logps import causal_lm_parts, sequence_logps
from lora_dpo.packing import choose_layout
from lora_dpo.scoring import score_pairs

CPU = torch.device("cpu")
ARCH_ATTENTION = [
    (arch, attention) for arch in ARCHITECTURES for attention in ("sdpa", "eager")
    if (arch, attention) != ("gemma2", "sdpa")  # Gemma 2's attention soft-capping needs eager
]


def unequal_pairs() -> list[TokenizedPair]:
    """Unequal pairs, one with no prompt (its first response token has nothing to predict it);
    every row is far longer than the sliding windows of SLIDING (3 positions)."""
    return random_pairs(count=5, seed=1) + [TokenizedPair((), (7, 8, 9), (10, 11), 99)]


def model_for(arch: str, attention: str, dtype: torch.dtype = torch.float32, backend: str = "dense"):
    model = make_model(arch, dtype, **SLIDING.get(arch, {}))
    model.config._attn_implementation = attention
    if backend == "pairwise":
        assert prepare_packed_attention(model, CPU).backend == "pairwise"
        assert model.config._attn_implementation in PAIRWISE
    return model


def values_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = sequence_logps(model, batch, chunk_size=4)
    return out, torch.autograd.grad(weighted_sum(out.logps), params, allow_unused=True)


@pytest.mark.parametrize("backend", ["dense", "pairwise"])
@pytest.mark.parametrize("arch, attention", ARCH_ATTENTION)
def test_packed_rows_equal_padded(arch: str, attention: str, backend: str):
    pairs = unequal_pairs()
    padded_model = model_for(arch, attention)
    padded, padded_grads = values_and_grads(padded_model, collate(pairs, pad_id=5))
    model = model_for(arch, attention, backend=backend)
    for collate_fn in (collate_packed, collate_prompt_shared):
        ours, grads = values_and_grads(model, collate_fn(pairs, pad_id=5))
        torch.testing.assert_close(ours.logps, padded.logps, **TOLERANCE[torch.float32])
        torch.testing.assert_close(ours.tokens, padded.tokens)
        assert_grads_close(grads, padded_grads, TOLERANCE[torch.float32])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_rows_equal_padded_in_bf16(arch: str):
    attention = "eager" if arch == "gemma2" else "sdpa"
    pairs = unequal_pairs()
    padded, padded_grads = values_and_grads(model_for(arch, attention, torch.bfloat16), collate(pairs, 5))
    ours, grads = values_and_grads(model_for(arch, attention, torch.bfloat16, "pairwise"), collate_packed(pairs, 5))
    torch.testing.assert_close(ours.logps, padded.logps, **TOLERANCE[torch.bfloat16])
    assert_grads_close(grads, padded_grads, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2"])
def test_sliding_window_matters_in_packed_rows(arch: str):
    """Guards the tests above: the window changes these rows' values, so a packed path that
    ignored it would fail there."""
    batch = collate_packed(unequal_pairs(), pad_id=5)
    with torch.no_grad():
        windowed = sequence_logps(model_for(arch, "eager", backend="pairwise"), batch).logps
        model = make_model(arch, torch.float32, sliding_window=10_000)
        prepare_packed_attention(model, CPU)
        full = sequence_logps(model, batch).logps
    assert (windowed - full).abs().max() > 1e-3


def test_pairs_in_a_row_do_not_see_each_other():
    """Changing pair 0's tokens changes pair 0's sums only, in the same row."""
    model = model_for("llama", "sdpa", backend="pairwise")
    pairs = random_pairs(count=3, seed=2, prompt=(4, 4), response=(5, 5))
    edited = [TokenizedPair((1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14), 0)] + pairs[1:]
    with torch.no_grad():
        before = sequence_logps(model, collate_packed(pairs, pad_id=5)).logps
        after = sequence_logps(model, collate_packed(edited, pad_id=5)).logps
    changed = (before != after).tolist()
    assert changed == [True, False, False, True, False, False]  # chosen 0..2, then rejected 0..2


def test_no_padding_reaches_the_decoder():
    """A packed micro-batch is one row of exactly the tokens the pairs need."""
    model = model_for("qwen2", "sdpa", backend="pairwise")
    pairs = unequal_pairs()
    seen: list[torch.Tensor] = []
    decoder = causal_lm_parts(model)[0]
    handle = decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]),
                                               with_kwargs=True)
    with torch.no_grad():
        sequence_logps(model, collate_packed(pairs, pad_id=5))
    handle.remove()
    (input_ids,) = seen
    assert input_ids.shape == (1, sum(map(packed_length, pairs)))
    expected = [t for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids]
    assert input_ids[0].tolist() == expected


def test_through_4bit_lora_policy_with_gradient_checkpointing(demo_workdir):
    """The real training setting, pair by pair: nf4 base, LoRA on all linear layers, fused
    frozen head, gradient checkpointing (whose recompute in backward must see the same
    attention). Values and LoRA gradients equal the padded computation's."""
    from lora_dpo.config import LoraConfig, ModelConfig
    from lora_dpo.model import attach_lora, load_base_model

    base = load_base_model(
        ModelConfig(name_or_path=str(demo_workdir / "model")), quantize=True, dtype=torch.float32, device=CPU
    )
    torch.manual_seed(0)
    policy = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    policy.train()
    pairs = random_pairs(count=6, seed=4, vocab=base.config.vocab_size, prompt=(1, 20), response=(1, 15))
    params = [p for p in policy.parameters() if p.requires_grad]
    padded = sequence_logps(policy, collate(pairs, pad_id=5), chunk_size=3)
    padded_grads = torch.autograd.grad(weighted_sum(padded.logps), params)
    assert choose_layout("auto", policy, CPU).name == "packed"
    for collate_fn in (collate_packed, collate_prompt_shared):
        ours = sequence_logps(policy, collate_fn(pairs, pad_id=5), chunk_size=3)
        grads = torch.autograd.grad(weighted_sum(ours.logps), params)
        torch.testing.assert_close(ours.logps, padded.logps, **TOLERANCE[torch.float32])
        assert_grads_close(grads, padded_grads, TOLERANCE[torch.float32])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("collate_fn", [collate_packed, collate_prompt_shared], ids=["packed", "prompt_shared"])
def test_flex_mask_mod_equals_the_dense_visibility(collate_fn, window):
    """The BlockMask's mask_mod, evaluated at every (query, key) by FlexAttention's own
    create_mask, is the dense visibility matrix elementwise (the CUDA path's mask)."""
    from torch.nn.attention.flex_attention import create_mask

    batch = collate_fn(unequal_pairs(), pad_id=5)
    rows, length = batch.input_ids.shape
    dense = create_mask(mask_mod(batch, window), rows, None, length, length, device="cpu")  # [R, 1, L, L]
    assert torch.equal(dense[:, 0], batch.visibility(window))
    assert batch.visibility(window).sum() < rows * length * (length + 1) // 2  # not merely causal


@pytest.mark.slow  # compiles FlexAttention's CPU kernel (about a minute the first time)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flex_attention_forward_on_cpu_equals_padded(arch: str):
    """FlexAttention for real (forward only: torch has no FlexAttention backward on the CPU),
    the model switched to flex_attention and given the BlockMask(s) of a packed row."""
    model = make_model(arch, torch.float32, **SLIDING.get(arch, {})).eval()
    pairs = unequal_pairs()
    with torch.no_grad():
        padded = sequence_logps(model, collate(pairs, pad_id=5)).logps
        model.set_attn_implementation("flex_attention")
        flex = sequence_logps(model, collate_packed(pairs, pad_id=5)).logps
    torch.testing.assert_close(flex, padded, **TOLERANCE[torch.float32])


def test_auto_layout_is_packed_where_supported_and_says_how():
    model = make_model("llama", torch.float32)
    layout = choose_layout("auto", model, CPU)
    assert layout.name == "packed" and layout.attention is not None
    assert layout.describe(4096, 4) == (
        "layout: packed, prompt shared, 4096 tokens per row; attention: pair by pair with dense "
        "per-pair masks (FlexAttention has no backward pass on the CPU)"
    )
    assert layout.describe(0, 4).startswith("layout: packed, prompt shared, 4 pairs per row;")
    assert choose_layout("prompt_shared", make_model("llama", torch.float32), CPU).name == "prompt_shared"
    padded = choose_layout("padded", make_model("llama", torch.float32), CPU)
    assert padded.describe(0, 8) == "layout: padded, chosen and rejected in separate rows, 8 pairs per batch"


def test_auto_layout_falls_back_with_the_reason_and_explicit_packing_is_refused():
    model = make_model("llama", torch.float32)
    model.config.model_type = "falcon"
    layout = choose_layout("auto", model, CPU)
    assert layout.name == "padded" and "falcon" in (layout.fallback or "")
    assert "(not packed: not supported for model type 'falcon'" in layout.describe(0, 4)
    for requested in ("packed", "prompt_shared"):
        with pytest.raises(ConfigError, match=f"train.layout={requested}: .*falcon.*padded"):
            choose_layout(requested, model, CPU)
    with pytest.raises(ConfigError, match="train.layout='tight'"):
        choose_layout("tight", model, CPU)


def test_a_model_switched_to_packed_attention_refuses_padded_batches():
    model = model_for("llama", "sdpa", backend="pairwise")
    with pytest.raises(RuntimeError, match="packed batches only"):
        sequence_logps(model, collate(unequal_pairs(), pad_id=5))


def test_scoring_by_token_budget_equals_padded_scoring():
    pairs = random_pairs(count=9, seed=5, prompt=(1, 12), response=(1, 9))
    padded = score_pairs(model_for("mistral", "sdpa"), pairs, batch_size=4, pad_id=5, device=CPU)
    model = model_for("mistral", "sdpa", backend="pairwise")
    for layout in ("packed", "prompt_shared"):
        scored = score_pairs(model, pairs, batch_size=4, pad_id=5, device=CPU, layout=layout, max_tokens=40)
        for field in ("chosen", "rejected"):
            torch.testing.assert_close(getattr(scored, field), getattr(padded, field), **TOLERANCE[torch.float32])
        assert torch.equal(scored.chosen_tokens, padded.chosen_tokens)
        assert torch.equal(scored.rejected_tokens, padded.rejected_tokens)
