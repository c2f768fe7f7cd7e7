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

from lora_dpo.attention import PAIRWISE, PairMasks, mask_mod, prepare_packed_attention
from lora_dpo.batching import collate, collate_packed, collate_prompt_shared, packed_length
from lora_dpo.data import TokenizedPair
from lora_dpo.demo.models import ARCHITECTURES
from lora_dpo.errors import ConfigError
from lora_dpo.logps import causal_lm_parts, sequence_logps
from lora_dpo.packing import choose_layout
from lora_dpo.scoring import score_pairs
from policies import loop_alone, move_lora_b_off_zero

CPU = torch.device("cpu")
ARCH_ATTENTION = [
    (arch, attention)
    for arch in ARCHITECTURES
    for attention in ("sdpa", "eager")
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
    ours, grads = values_and_grads(
        model_for(arch, attention, torch.bfloat16, "pairwise"), collate_packed(pairs, 5)
    )
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
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
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
@pytest.mark.parametrize(
    "collate_fn", [collate_packed, collate_prompt_shared], ids=["packed", "prompt_shared"]
)
def test_flex_mask_mod_equals_the_dense_visibility(collate_fn, window):
    """The BlockMask's mask_mod, evaluated at every (query, key) by FlexAttention's own
    create_mask, is the dense visibility matrix elementwise (the CUDA path's mask)."""
    from torch.nn.attention.flex_attention import create_mask

    batch = collate_fn(unequal_pairs(), pad_id=5)
    rows, length = batch.input_ids.shape
    dense = create_mask(mask_mod(batch, window), rows, None, length, length, device="cpu")  # [R, 1, L, L]
    assert torch.equal(dense[:, 0], batch.visibility(window))
    assert batch.visibility(window).sum() < rows * length * (length + 1) // 2  # not merely causal


@pytest.mark.parametrize("always_mask", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 3, 10_000])
@pytest.mark.parametrize(
    "collate_fn", [collate_packed, collate_prompt_shared], ids=["packed", "prompt_shared"]
)
def test_pair_parts_cover_exactly_the_visible_entries(collate_fn, window, always_mask):
    """The pairwise backend's calls (head: prompt + chosen, causal unless masked; tail:
    rejected over prompt + rejected), put back into a row's [L, L], are the dense visibility
    on every real token; they compute fewer entries than one n x n block per pair."""
    batch = collate_fn(unequal_pairs(), pad_id=5)
    rows, length = batch.input_ids.shape
    rebuilt = torch.zeros(rows, length, length, dtype=torch.bool)
    computed = 0
    for part in PairMasks(batch, torch.float32, always_mask).parts(window):
        head = slice(part.start, part.start + part.head)
        if part.head_mask is None:
            assert not always_mask and (window is None or window >= part.head)
            rebuilt[part.row, head, head] = torch.ones(part.head, part.head, dtype=torch.bool).tril()
        else:
            assert part.head_mask.shape == (1, 1, part.head, part.head)
            rebuilt[part.row, head, head] = part.head_mask[0, 0] == 0
        computed += part.head**2
        if part.tail:
            assert part.tail_mask is not None
            assert part.tail_mask.shape == (1, 1, part.tail, part.prompt + part.tail)
            tail = torch.arange(part.start + part.head, part.start + part.head + part.tail)
            keys = torch.cat([torch.arange(part.start, part.start + part.prompt), tail])
            rebuilt[part.row, tail[:, None], keys[None]] = part.tail_mask[0, 0] == 0
            computed += part.tail * (part.prompt + part.tail)
    real = batch.documents >= 0  # [R, L]
    visibility = batch.visibility(window)
    for row in range(rows):
        assert torch.equal(rebuilt[row][real[row]], visibility[row][real[row]])
    assert computed < sum((end - start) ** 2 for _, start, end in batch.spans)


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
        "layout: packed, prompt shared, 4096 tokens per row; attention: pair by pair, causal "
        "kernels with masks per pair (FlexAttention has no backward pass on the CPU)"
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
            torch.testing.assert_close(
                getattr(scored, field), getattr(padded, field), **TOLERANCE[torch.float32]
            )
        assert torch.equal(scored.chosen_tokens, padded.chosen_tokens)
        assert torch.equal(scored.rejected_tokens, padded.rejected_tokens)


def test_a_padded_layout_undoes_the_pairwise_switch():
    """A base reused by a later padded run (a sweep) runs padded batches again."""
    model = model_for("llama", "sdpa", backend="pairwise")
    assert choose_layout("padded", model, CPU).name == "padded"
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sequence_logps(model, collate(unequal_pairs(), pad_id=5))


def test_config_layout_choices_are_the_layouts():
    import dataclasses

    from lora_dpo.batching import LAYOUTS
    from lora_dpo.config import TrainConfig
    from lora_dpo.domains import DOMAIN
    from lora_dpo.packing import LAYOUT_CHOICES

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "layout")
    assert set(field.metadata[DOMAIN].choices) == set(LAYOUT_CHOICES) == {"auto", *LAYOUTS}


# Training: micro-batches by token budget, in every layout, against one big padded batch.


@pytest.fixture(scope="module")
def policy_setup(demo_workdir):
    """A 4-bit LoRA policy moved off its init, 12 demo pairs, and reference values near it."""
    from lora_dpo.batching import pad_id_of
    from lora_dpo.data import load_preference_data
    from lora_dpo.demo import demo_config
    from lora_dpo.model import attach_lora, load_base_model, load_tokenizer

    config = demo_config(demo_workdir)
    tokenizer = load_tokenizer(config.model)
    pairs = load_preference_data(config.data, tokenizer, "train")[0][:12]
    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    policy = attach_lora(base, config.lora, gradient_checkpointing=True)
    move_lora_b_off_zero(policy)
    initial = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        start = score_pairs(policy, pairs, batch_size=12, pad_id=pad_id_of(tokenizer), device=CPU)
    from lora_dpo.cache import ReferenceValues

    reference = ReferenceValues(
        start.chosen + torch.randn(12, generator=generator),
        start.rejected + torch.randn(12, generator=generator),
        start.chosen_tokens,
        start.rejected_tokens,
    )
    return policy, initial, pairs, reference, pad_id_of(tokenizer), config.train


def one_step(policy_setup, layout: str, micro_batches: list[list[int]]):
    """One optimizer step of SGD at lr 1 without clipping: the update is minus the gradient."""
    import dataclasses

    from lora_dpo.config import Config

    policy, initial, pairs, reference, pad_id, train_cfg = policy_setup
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    assert choose_layout(layout, policy, CPU).name == layout
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = Config(train=dataclasses.replace(train_cfg, max_grad_norm=None))
    loop = loop_alone(
        config, pairs, policy, pad_id, layout, optimizer=optimizer, scheduler=scheduler, reference=reference
    )
    loop.step(micro_batches, len(pairs), None)
    state = loop.state
    metrics, window = state.meter.flush()
    assert [finite for finite, _ in window] == [True]
    update = {name: initial[name] - p.detach() for name, p in policy.named_parameters() if name in initial}
    return metrics, metrics["grad_norm"], update


@pytest.mark.parametrize("layout", ["packed", "prompt_shared", "padded"])
def test_token_budget_micro_batches_equal_one_big_batch(policy_setup, layout):
    """Micro-batches of different pair counts weight every pair alike: the loss, the metrics
    and the gradient equal those of all pairs in one padded batch."""
    from lora_dpo.batching import token_budget_batches

    pairs = policy_setup[2]
    big_metrics, big_norm, big_update = one_step(policy_setup, "padded", [list(range(12))])
    from lora_dpo.batching import batch_tokens

    micro_batches = token_budget_batches(pairs, range(12), layout, batch_tokens(layout, pairs[:5]))
    assert len({len(batch) for batch in micro_batches}) > 1  # pair counts differ
    metrics, norm, update = one_step(policy_setup, layout, micro_batches)
    assert big_metrics["loss"] > 0.1
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[key] == pytest.approx(big_metrics[key], rel=1e-5, abs=1e-6), key
    assert norm == pytest.approx(big_norm, rel=1e-5)
    assert_grads_close(list(update.values()), list(big_update.values()), TOLERANCE[torch.float32])


def test_training_steps_by_token_budget_are_deterministic_and_cover_every_pair(policy_setup):
    import dataclasses

    from lora_dpo.batching import batch_tokens
    from lora_dpo.optim import optimizer_steps

    pairs = policy_setup[2] * 4  # 48 pairs
    cfg = dataclasses.replace(
        policy_setup[5],
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        max_tokens_per_batch=120,
        epochs=2,
        max_steps=-1,
    )
    steps = list(optimizer_steps(pairs, cfg, layout="packed"))
    assert steps == list(optimizer_steps(pairs, cfg, layout="packed"))  # deterministic per seed
    assert steps != list(optimizer_steps(pairs, dataclasses.replace(cfg, seed=cfg.seed + 1), layout="packed"))
    assert len(steps) == 12  # 48 pairs, 8 per step, 2 epochs
    for epoch in (steps[:6], steps[6:]):
        assert sorted(i for micro, _ in epoch for batch in micro for i in batch) == list(range(48))
    for micro, pairs_in_step in steps:
        assert pairs_in_step == 8 == sum(map(len, micro))
        assert all(
            batch_tokens("packed", [pairs[i] for i in batch]) <= 120 or len(batch) == 1 for batch in micro
        )
    # on two ranks, each rank's micro-batches hold the rank's half of the same global batch
    ranks = [list(optimizer_steps(pairs, cfg, rank, 2, "packed")) for rank in (0, 1)]
    one = list(
        optimizer_steps(pairs, dataclasses.replace(cfg, gradient_accumulation_steps=4), layout="packed")
    )
    for (a, n), (b, _), (whole, m) in zip(ranks[0], ranks[1], one):
        assert n == m and sorted(i for batch in a + b for i in batch) == sorted(
            i for batch in whole for i in batch
        )


# Whole runs: the cache across layouts, resume, and two ranks.


def run_config(workdir, tmp_path, cache: str, **train):
    from lora_dpo.demo import demo_config

    config = demo_config(workdir)
    config.data.max_pairs = 24
    config.data.eval_path = ""
    config.train.generate_every = 0  # samples need held-out prompts
    config.precompute.cache_dir = str(tmp_path / cache)
    config.train.output_dir = str(tmp_path / "run")
    config.train.per_device_batch_size = 4
    config.train.gradient_accumulation_steps = 2
    config.train.logging_steps = 1
    config.train.save_steps = 0
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.mark.parametrize("cache_layout, train_layout", [("padded", "packed"), ("packed", "padded")])
def test_the_cache_serves_every_layout(demo_workdir, tmp_path, caplog, cache_layout, train_layout):
    """A cache built in one layout passes the step-0 check of a run in another: the same pair
    hashes, the same values up to rounding, policy at init == reference (loss ln 2)."""
    import math

    from lora_dpo.cache import ReferenceCache
    from lora_dpo.train import train
    from precompute import precompute_reference

    built = {}
    for layout in ("padded", "packed"):
        config = run_config(
            demo_workdir, tmp_path, f"cache-{layout}", layout=layout, max_tokens_per_batch=200
        )
        precompute_reference(config)
        built[layout] = ReferenceCache(config.precompute.cache_dir)
    assert built["padded"].pair_hashes == built["packed"].pair_hashes
    assert built["padded"].manifest.identity == built["packed"].manifest.identity
    torch.testing.assert_close(
        built["padded"].chosen_logps, built["packed"].chosen_logps, rtol=1e-5, atol=1e-4
    )
    config = run_config(
        demo_workdir,
        tmp_path,
        f"cache-{cache_layout}",
        layout=train_layout,
        max_steps=1,
        max_tokens_per_batch=150,
    )
    with caplog.at_level("INFO"):
        result = train(config)  # the step-0 check raises on a disagreement
    assert "step-0 check" in caplog.text
    assert (
        f"layout: {'packed, prompt shared, 150 tokens per row' if train_layout == 'packed' else 'padded'}"
        in caplog.text
    )
    assert abs(result.history[0]["loss"] - math.log(2)) < 1e-5


def test_resume_with_token_budget_is_bit_identical(demo_workdir, tmp_path, monkeypatch):
    """Packed micro-batches by token budget: a run crashed after step 4 and resumed has exactly
    the losses and adapter of an uninterrupted one (the data order is a function of the seed)."""
    from safetensors.torch import load_file

    import lora_dpo.train as train_module
    from lora_dpo.faults import FAIL_AT_STEP, InjectedFault
    from precompute import precompute_reference

    def config_for(name: str):
        config = run_config(demo_workdir, tmp_path, "cache", max_tokens_per_batch=150, epochs=2, save_steps=2)
        config.train.output_dir = str(tmp_path / name)
        config.lora.dropout = 0.1  # dropout draws from the RNG: its state must come back too
        return config

    precompute_reference(config_for("whole"))
    whole = train_module.train(config_for("whole"))
    # The fault hook crashes the run after step 4, right after the checkpoint due there.
    monkeypatch.setenv(FAIL_AT_STEP, "4")
    with pytest.raises(InjectedFault, match="failed on purpose at step 4"):
        train_module.train(config_for("stopped"))
    monkeypatch.delenv(FAIL_AT_STEP)
    resumed = train_module.train(config_for("stopped"), resume=True)

    def losses(history):
        return [(r["step"], r["loss"]) for r in history]

    assert losses(resumed.history) == losses(whole.history)[4:]
    assert [step for step, _ in losses(resumed.history)] == [5, 6]
    a = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two torchrun ranks (gloo)
def test_token_budget_on_two_ranks_equals_one_process(demo_workdir, tmp_path):
    """The same global batches, by token budget in packed rows: one process accumulating
    against two ranks, equal losses and adapters."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from lora_dpo.config import dump_config

    root = Path(__file__).resolve().parents[1]

    def run(command: list[str], name: str, **train):
        config = run_config(demo_workdir, tmp_path, "cache", max_steps=3, max_tokens_per_batch=100, **train)
        config.data.max_pairs = 40
        config.train.output_dir = str(tmp_path / name)
        config.train.layout = "packed"
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(dump_config(config))
        result = subprocess.run(
            [*command, "--config", str(config_file)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=400,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return Path(config.train.output_dir)

    cli = [sys.executable, "-m", "lora_dpo.cli"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lora_dpo.cli",
    ]
    run([*cli, "precompute-ref"], "cache-build")
    one = run([*cli, "train"], "one", gradient_accumulation_steps=2)
    two = run([*torchrun, "train"], "two", gradient_accumulation_steps=1)

    def losses(run_dir: Path) -> list[float]:
        return [
            r["loss"]
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert len(losses(one)) == len(losses(two)) == 3
    assert max(abs(a - b) for a, b in zip(losses(one), losses(two))) < 1e-5
    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_old_prefix_sharing_key_keeps_its_meaning():
    from lora_dpo.config import load_config

    assert load_config(None, ["train.prefix_sharing=true"]).train.layout == "prompt_shared"
    assert load_config(None, ["train.prefix_sharing=false"]).train.layout == "padded"
    assert load_config(None, []).train.layout == "auto"
    with pytest.raises(ConfigError, match="train.prefix_sharing: expected true or false"):
        load_config(None, ["train.prefix_sharing=3"])
    with pytest.raises(
        ConfigError, match="train.layout='tight': must be one of auto, padded, prompt_shared, packed"
    ):
        load_config(None, ["train.layout=tight"])
    with pytest.raises(ConfigError, match="train.max_tokens_per_batch=-1"):
        load_config(None, ["train.max_tokens_per_batch=-1"])
