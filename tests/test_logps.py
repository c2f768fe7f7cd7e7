"""The log-prob function against a plain oracle (full logits, log_softmax, gather): values and
gradients, fp32 and bf16, on tiny random models of several architectures, through both head
paths (fused frozen head, checkpointed trainable head) with chunks smaller than N, and through
4-bit + LoRA. The prompt-shared layout (one pair per row, dense masks) against the padded
computation; tests/test_packing.py has the packed layout and the other attention backends.

Tolerances: fp32 within 1e-5 relative (atol 1e-4 on sums of ~-100). bf16 rounds the decoder
and the head matmul to 8 mantissa bits, so the oracle and the chunked path (which agree in
exact arithmetic) differ by bf16 rounding: rtol 2e-2, atol 2e-1 on the sums, and the same on
gradients scaled by their largest entry.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from lora_dpo.attention import check_packing_support
from lora_dpo.batching import IGNORE_INDEX, PairBatch, collate, collate_prompt_shared
from lora_dpo.config import TrainConfig
from lora_dpo.data import TokenizedPair
from lora_dpo.demo.models import ARCHITECTURES, tiny_config
from lora_dpo.errors import ConfigError
from lora_dpo.logps import (
    DEFAULT_LOGITS_CHUNK_SIZE,
    causal_lm_parts,
    sequence_logps,
)

VOCAB = 97


def random_batch(pairs: int = 3, seed: int = 0) -> PairBatch:
    """[2B, T] right-padded rows with different prompt and response lengths; pad id = a real id."""
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    width = 14
    input_ids = torch.full((rows, width), 5, dtype=torch.long)  # pad with an id that also occurs
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row in range(rows):
        prompt = 2 + row % 4
        length = prompt + 3 + (row * 5) % 7
        ids = torch.randint(0, VOCAB, (length,), generator=generator)
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
        labels[row, prompt:length] = ids[prompt:]
    return PairBatch(input_ids, attention_mask, labels, [bytes(32)] * pairs, list(range(pairs)))


def oracle_logps(model, batch: PairBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)  # [2B, T-1, V]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    gathered = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (gathered * mask).sum(-1)  # [2B]


def make_model(arch: str, dtype: torch.dtype, frozen_head: bool = False, **config_overrides):
    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=VOCAB)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init is near-uniform; scale the head so log-probs are far from -log(V).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    if frozen_head:  # as in LoRA training and in the precompute: the fused path
        model.get_output_embeddings().requires_grad_(False)
    return model


def weighted_sum(logps: torch.Tensor) -> torch.Tensor:
    """A loss with a different weight per sequence, so a mix-up of rows shows in the gradients."""
    return (logps * torch.linspace(0.5, 1.5, len(logps))).sum()


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-1)}


def assert_grads_close(ours_grads, ref_grads, tol) -> None:
    for ours_grad, ref_grad in zip(ours_grads, ref_grads):
        if ref_grad is None:
            assert ours_grad is None or torch.count_nonzero(ours_grad) == 0
            continue
        scale = ref_grad.abs().max().clamp(min=1.0)
        torch.testing.assert_close(ours_grad / scale, ref_grad / scale, **tol)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "head, chunk_size",
    [("frozen", 3), ("trainable", 3), ("frozen", DEFAULT_LOGITS_CHUNK_SIZE)],
    ids=["frozen-chunk3", "trainable-chunk3", "frozen-chunk_default"],
)
def test_matches_oracle_values_and_gradients(arch: str, dtype: torch.dtype, head: str, chunk_size: int):
    model = make_model(arch, dtype, frozen_head=head == "frozen")
    assert causal_lm_parts(model)[1].frozen_linear == (head == "frozen")  # the path under test
    batch = random_batch()
    assert (batch.labels != IGNORE_INDEX).sum() > 3 * chunk_size or chunk_size > 3  # several chunks
    params = [p for p in model.parameters() if p.requires_grad]

    ours = sequence_logps(model, batch, chunk_size=chunk_size)
    grads_ours = torch.autograd.grad(weighted_sum(ours.logps), params, allow_unused=True)
    reference = oracle_logps(model, batch)
    grads_ref = torch.autograd.grad(weighted_sum(reference), params, allow_unused=True)

    tol = TOLERANCE[dtype]
    assert ours.logps.dtype == torch.float32
    torch.testing.assert_close(ours.logps, reference, **tol)
    torch.testing.assert_close(ours.tokens, (batch.labels[:, 1:] != IGNORE_INDEX).sum(1))
    assert_grads_close(grads_ours, grads_ref, tol)


def test_frozen_head_gets_no_weight_gradient_and_the_rest_does():
    model = make_model("llama", torch.float32, frozen_head=True)
    sequence_logps(model, random_batch(), chunk_size=3).logps.sum().backward()
    assert model.get_output_embeddings().weight.grad is None
    assert model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.1." in n)


def test_chunk_size_changes_nothing_but_rounding():
    model = make_model("qwen2", torch.float32, frozen_head=True)
    batch = random_batch(pairs=4, seed=3)
    with torch.no_grad():
        results = [sequence_logps(model, batch, chunk_size=size).logps for size in (1, 3, 7, 10_000)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(model, batch, chunk_size=0)


def test_default_chunk_size_is_the_config_default():
    assert TrainConfig().logits_chunk_size == DEFAULT_LOGITS_CHUNK_SIZE


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows any tensor with a vocabulary-sized last dimension ever has."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.ndim >= 1 and tensor.shape[-1] == self.vocab:
                self.rows = max(self.rows, tensor.numel() // self.vocab)
        return out


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_logits_exist_one_chunk_at_a_time(head: str):
    """Forward and backward: no tensor holds more than chunk_size rows of logits (the head
    weight [V, H] is a parameter, not an op output; its gradient, on the trainable path, has
    H rows)."""
    model = make_model("gemma2", torch.float32, frozen_head=head == "frozen")
    batch = random_batch(pairs=4)
    responses = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    with LargestVocabTensor(VOCAB) as probe:
        sequence_logps(model, batch, chunk_size=5).logps.sum().backward()
    assert responses > 20 and probe.rows <= max(5, model.config.hidden_size)
    with LargestVocabTensor(VOCAB) as full:
        oracle_logps(model, batch).sum().backward()
    assert full.rows >= responses  # the probe does see full logits when they exist


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_softcapped_head_is_applied(head: str):
    """Gemma 2 caps its logits: dropping the cap would change the values noticeably."""
    model = make_model("gemma2", torch.float32, frozen_head=head == "frozen")
    model.config.final_logit_softcapping = 3.0  # tight, so the cap matters for these logits
    batch = random_batch()
    with torch.no_grad():
        capped = sequence_logps(model, batch, chunk_size=4).logps
        torch.testing.assert_close(capped, oracle_logps(model, batch), rtol=1e-5, atol=1e-4)
        model.config.final_logit_softcapping = None
        uncapped = oracle_logps(model, batch)
    assert (capped - uncapped).abs().max() > 1.0


def test_padding_and_pad_id_do_not_matter():
    """Extra padding columns, filled with any id, leave the sums unchanged."""
    model = make_model("llama", torch.float32)
    batch = random_batch()
    wide = PairBatch(
        torch.cat([batch.input_ids, torch.full((6, 5), 11)], 1),
        torch.cat([batch.attention_mask, torch.zeros(6, 5, dtype=torch.long)], 1),
        torch.cat([batch.labels, torch.full((6, 5), IGNORE_INDEX)], 1),
        batch.pair_hashes,
        batch.source_indices,
    )
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch).logps, sequence_logps(model, wide).logps)


def test_softcapped_frozen_head_gradients_match_the_oracle():
    model = make_model("gemma2", torch.float32, frozen_head=True)
    model.config.final_logit_softcapping = 3.0
    batch = random_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(weighted_sum(sequence_logps(model, batch, chunk_size=4).logps), params)
    reference = torch.autograd.grad(weighted_sum(oracle_logps(model, batch)), params)
    assert_grads_close(ours, reference, TOLERANCE[torch.float32])


def test_logit_scale_is_applied():
    """Cohere-style heads multiply their logits; both head paths apply the scale."""
    for frozen in (False, True):
        model = make_model("llama", torch.float32, frozen_head=frozen)
        batch = random_batch()
        with torch.no_grad():
            plain = sequence_logps(model, batch).logps
            model.config.logit_scale = 0.25
            scaled = sequence_logps(model, batch, chunk_size=4).logps
            model.config.logit_scale = None
            model.get_output_embeddings().weight.mul_(0.25)
            expected = sequence_logps(model, batch).logps  # the same logits, by another route
        assert (plain - scaled).abs().max() > 1.0
        torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-4)


def test_logit_scale_gradients_agree_between_head_paths():
    """The fused path's hand-written gradient against autograd through the checkpointed path."""
    model = make_model("llama", torch.float32)
    model.config.logit_scale = 0.25
    batch = random_batch()
    body = [p for n, p in model.named_parameters() if "lm_head" not in n]
    autograd_path = torch.autograd.grad(weighted_sum(sequence_logps(model, batch, chunk_size=4).logps), body)
    model.get_output_embeddings().requires_grad_(False)
    fused_path = torch.autograd.grad(weighted_sum(sequence_logps(model, batch, chunk_size=4).logps), body)
    assert_grads_close(fused_path, autograd_path, TOLERANCE[torch.float32])


def test_unsupported_logit_rescaling_is_refused():
    model = make_model("llama", torch.float32)
    model.config.logits_scaling = 8.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        sequence_logps(model, random_batch())


def test_through_4bit_lora_policy(demo_workdir):
    """The real training setting: nf4 base, LoRA on all linear layers, frozen head (fused path),
    gradient checkpointing; LoRA gradients equal the oracle's."""
    from lora_dpo.config import LoraConfig, ModelConfig
    from lora_dpo.model import attach_lora, load_base_model

    base = load_base_model(
        ModelConfig(name_or_path=str(demo_workdir / "model")),
        quantize=True,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    torch.manual_seed(0)
    policy = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert causal_lm_parts(policy)[1].frozen_linear
    policy.train()
    batch = random_pairs_batch(vocab=base.config.vocab_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    ours = sequence_logps(policy, batch, chunk_size=3)
    grads_ours = torch.autograd.grad(weighted_sum(ours.logps), params)
    reference = oracle_logps(policy, batch)
    grads_ref = torch.autograd.grad(weighted_sum(reference), params)
    torch.testing.assert_close(ours.logps, reference, **TOLERANCE[torch.float32])
    assert_grads_close(grads_ours, grads_ref, TOLERANCE[torch.float32])


# Prompt shared: one row per pair, the prompt forwarded once.


def random_pairs(count: int = 4, seed: int = 0, vocab: int = VOCAB, prompt=(1, 9), response=(1, 7)):
    rng = random.Random(seed)

    def ids(bounds):
        return tuple(rng.randrange(vocab) for _ in range(rng.randint(*bounds)))

    return [TokenizedPair(ids(prompt), ids(response), ids(response), i) for i in range(count)]


def random_pairs_batch(vocab: int) -> PairBatch:
    return collate(random_pairs(vocab=vocab), pad_id=5)


SLIDING = {
    "mistral": {"sliding_window": 3},
    "gemma2": {"sliding_window": 3},
    "qwen2": {
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 1,
        "layer_types": ["full_attention", "sliding_attention"],
    },
}


@pytest.mark.parametrize(
    "arch, attention",
    [
        (arch, attention)
        for arch in ARCHITECTURES
        for attention in ("sdpa", "eager")
        if (arch, attention) != ("gemma2", "sdpa")
    ],  # Gemma 2's attention soft-capping needs eager
)
def test_prefix_sharing_equals_unshared(arch: str, attention: str):
    """Values and gradients of packed pairs equal the unshared [2B, T] computation, including
    a first response token with no prompt before it and sliding windows shorter than the rows."""
    model = make_model(arch, torch.float32, **SLIDING.get(arch, {}))
    model.config._attn_implementation = attention
    pairs = random_pairs(count=4, seed=1) + [TokenizedPair((), (7, 8, 9), (10, 11), 99)]
    params = [p for p in model.parameters() if p.requires_grad]

    packed = sequence_logps(model, collate_prompt_shared(pairs, pad_id=5), chunk_size=4)
    grads_packed = torch.autograd.grad(weighted_sum(packed.logps), params, allow_unused=True)
    unshared = sequence_logps(model, collate(pairs, pad_id=5), chunk_size=4)
    grads_unshared = torch.autograd.grad(weighted_sum(unshared.logps), params, allow_unused=True)

    torch.testing.assert_close(packed.logps, unshared.logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed.tokens, unshared.tokens)
    assert_grads_close(grads_packed, grads_unshared, TOLERANCE[torch.float32])


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2"])
def test_sliding_window_matters_in_the_packed_test(arch: str):
    """Guards the test above: with these rows the window changes the values, so a packed mask
    that ignored it would fail there."""
    pairs = random_pairs(count=4, seed=1)
    batch = collate_prompt_shared(pairs, pad_id=5)
    with torch.no_grad():
        windowed = sequence_logps(make_model(arch, torch.float32, **SLIDING[arch]), batch).logps
        full = sequence_logps(make_model(arch, torch.float32, sliding_window=10_000), batch).logps
    assert (windowed - full).abs().max() > 1e-3


def test_rejected_does_not_see_chosen_when_packed():
    """Changing a chosen token changes the chosen sum only, never the rejected one."""
    model = make_model("llama", torch.float32)
    pair = random_pairs(count=1, seed=2, prompt=(4, 4), response=(5, 5))[0]
    edited = TokenizedPair(
        pair.prompt_ids, pair.chosen_ids[:2] + (3,) + pair.chosen_ids[3:], pair.rejected_ids, 0
    )
    with torch.no_grad():
        before = sequence_logps(model, collate_prompt_shared([pair], pad_id=5)).logps
        after = sequence_logps(model, collate_prompt_shared([edited], pad_id=5)).logps
    assert before[0] != after[0]
    assert before[1] == after[1]


def test_prefix_sharing_refuses_untested_models():
    model = make_model("llama", torch.float32)
    model.config.model_type = "falcon"
    with pytest.raises(ConfigError, match="layout.*falcon"):
        check_packing_support(model)
    model = make_model("llama", torch.float32)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="eager, sdpa or flex_attention"):
        check_packing_support(model)


# Optional per-sequence statistics: LD-DPO's shared prefix, WPO's log Σp².


def oracle_statistics(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared-prefix sums [2B], Σ log Σ_v p_v² [2B]) from full logits, position by position:
    a response's first min(|yw|, |yl|) tokens are its first that many masked positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)  # [2B, T-1, V]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    gathered = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [2B, T-1]
    counts = mask.sum(1)
    pairs = len(counts) // 2
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)  # [2B]
    in_prefix = mask & (mask.cumsum(1) <= shared[:, None])
    log_sum_sq = torch.logsumexp(2 * logprobs, dim=-1)  # [2B, T-1] log Σ p²
    return (gathered * in_prefix).sum(-1), (log_sum_sq * mask).sum(-1)


@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_shared_prefix_and_log_sum_sq_match_the_oracle(head: str):
    model = make_model("llama", torch.float32, frozen_head=head == "frozen")
    batch = random_batch(pairs=3)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = sequence_logps(model, batch, chunk_size=3, shared_prefix=True, log_sum_sq_probs=True)
    plain = sequence_logps(model, batch, chunk_size=3)
    shared, log_sum_sq = oracle_statistics(model, batch)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(ours.logps, plain.logps, rtol=0, atol=0)  # asking changes nothing else
    torch.testing.assert_close(ours.shared_logps, shared, **tol)
    torch.testing.assert_close(ours.log_sum_sq_probs, log_sum_sq, **tol)
    assert not ours.log_sum_sq_probs.requires_grad
    lengths = ours.tokens
    assert (
        torch.minimum(lengths[:3], lengths[3:]) < torch.maximum(lengths[:3], lengths[3:])
    ).any()  # a real cut
    grads_ours = torch.autograd.grad(weighted_sum(ours.shared_logps), params, allow_unused=True)
    grads_ref = torch.autograd.grad(weighted_sum(shared), params, allow_unused=True)
    assert_grads_close(grads_ours, grads_ref, tol)


def test_shared_prefix_is_the_same_with_the_prompt_shared():
    model = make_model("llama", torch.float32)
    pairs = random_pairs(count=4, seed=2) + [TokenizedPair((), (7, 8, 9), (10, 11), 99)]
    packed = sequence_logps(
        model, collate_prompt_shared(pairs, pad_id=5), chunk_size=4, shared_prefix=True, log_sum_sq_probs=True
    )
    unshared = sequence_logps(
        model, collate(pairs, pad_id=5), chunk_size=4, shared_prefix=True, log_sum_sq_probs=True
    )
    torch.testing.assert_close(packed.shared_logps, unshared.shared_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed.log_sum_sq_probs, unshared.log_sum_sq_probs, rtol=1e-5, atol=1e-4)


def test_prefix_sums_of_interleaved_sequences():
    """Sequence 0's values 1, 2, 3 and sequence 1's 10, 20 interleaved; first 2 and first 1."""
    from lora_dpo.logps import prefix_sums

    values = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0])
    rows = torch.tensor([0, 1, 0, 1, 0])
    torch.testing.assert_close(prefix_sums(values, rows, torch.tensor([2, 1])), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(prefix_sums(values, rows, torch.tensor([5, 0])), torch.tensor([6.0, 0.0]))
