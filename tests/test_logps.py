"""The log-prob function against a plain oracle (full logits, log_softmax, gather): values and
gradients, fp32 and bf16, on tiny random models of several architectures, and through 4-bit + LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dpo.batching import IGNORE_INDEX, PairBatch
from lora_dpo.logps import sequence_logps
from lora_dpo.tiny_model import ARCHITECTURES, tiny_config

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


def make_model(arch: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=VOCAB), dtype=dtype)
    # Random init is near-uniform; scale the head so log-probs are far from -log(V).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle_values_and_gradients(arch: str, dtype: torch.dtype):
    model = make_model(arch, dtype)
    batch = random_batch()
    params = [p for p in model.parameters()]

    ours = sequence_logps(model, batch)
    grads_ours = torch.autograd.grad(ours.logps.sum(), params, allow_unused=True)
    reference = oracle_logps(model, batch)
    grads_ref = torch.autograd.grad(reference.sum(), params, allow_unused=True)

    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-1)
    assert ours.logps.dtype == torch.float32
    torch.testing.assert_close(ours.logps, reference, **tol)
    torch.testing.assert_close(ours.tokens, (batch.labels[:, 1:] != IGNORE_INDEX).sum(1))
    for ours_grad, ref_grad in zip(grads_ours, grads_ref):
        if ref_grad is None:
            assert ours_grad is None or torch.count_nonzero(ours_grad) == 0
            continue
        scale = ref_grad.abs().max().clamp(min=1.0)
        torch.testing.assert_close(ours_grad / scale, ref_grad / scale, **tol)


def test_softcapped_head_is_applied():
    """Gemma 2 caps its logits: dropping the cap would change the values noticeably."""
    model = make_model("gemma2", torch.float32)
    model.config.final_logit_softcapping = 3.0  # tight, so the cap matters for these logits
    batch = random_batch()
    with torch.no_grad():
        capped = sequence_logps(model, batch).logps
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
