"""The check every merge ends with: the saved model, loaded as a user would load it, against
base + adapter (unmerged) on fixed inputs: max / mean |Δlogit| and argmax agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Fixed verification inputs: general text, a chat turn, and the demo's prompt shape.
VERIFY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Describe Ada in a few words.\nAda is kind and curious.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
)
# In fp32 the merged model differs from base+adapter by float rounding only (tested on tiny
# models at 1e-4). bf16/fp16 weights round every merged value, so their differences are larger.
FP32_TOLERANCE = 1e-4


def encode_prompts(
    tokenizer, prompts: tuple[str, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [N, T], right-padded; the mask comes from the lengths
    (pad ids may equal real ones)."""
    ids = [tokenizer(prompt).input_ids for prompt in prompts]
    longest = max(len(row) for row in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids.to(device), mask.to(device)


def logits_at(model: torch.nn.Module, encoded: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """[T_i, V] fp32 logits on the CPU at each input's real positions; one batched forward."""
    input_ids, mask = encoded
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # [N, T, V]
    return [row[: int(n)].float().cpu() for row, n in zip(logits, mask.sum(dim=1))]


def verify(
    model_dir: Path,
    encoded: tuple[torch.Tensor, torch.Tensor],
    reference: list[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Load the saved model as a user would and compare its logits with base+adapter's."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map={"": str(device)}, trust_remote_code=trust_remote_code
    )
    logits = logits_at(merged, (encoded[0].to(device), encoded[1].to(device)))
    del merged
    return compare_logits(reference, logits)


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> dict[str, Any]:
    """Max / mean absolute difference and argmax agreement over every position of every input."""
    diffs = torch.cat([(r - m).abs().flatten() for r, m in zip(reference, merged)])
    agree = torch.cat([r.argmax(-1) == m.argmax(-1) for r, m in zip(reference, merged)])  # [N]
    return {
        "prompts": len(reference),
        "positions": int(agree.numel()),
        "max_abs_diff": diffs.max().item(),
        "mean_abs_diff": diffs.mean().item(),
        "argmax_agreement": agree.float().mean().item(),
        "argmax_all_agree": bool(agree.all()),
    }
