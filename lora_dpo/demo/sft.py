"""Teach the demo's random tiny model the task's format before DPO: a few seconds of supervised
fine-tuning on both responses of every training pair.

A random model writes noise, so a DPO run on it can show the preference only in reward
accuracy. After this step the reference writes "X is A and B." with kind and unkind words
alike (it saw each as often), so generations show what DPO changed: which words it picks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from lora_dpo.batching import collate, pad_id_of
from lora_dpo.data import TokenizedPair
from lora_dpo.logps import sequence_logps

SFT_STEPS = 400  # ~25 passes over the SFT pairs: the format is sharp (few malformed samples)
SFT_BATCH_PAIRS = 32
SFT_LEARNING_RATE = 3e-3


def teach_format(
    model_dir: Path,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    *,
    steps: int = SFT_STEPS,
    seed: int = 0,
) -> float:
    """Full fine-tune of the fp32 model in `model_dir` on prompt + response for chosen and
    rejected alike (response tokens only, EOS included, so it learns to stop), saved back in
    place. Deterministic per seed; returns the last step's mean token NLL."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE)
    rng = random.Random(seed)
    pad_id = pad_id_of(tokenizer)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = collate([pairs[i] for i in rng.sample(range(len(pairs)), SFT_BATCH_PAIRS)], pad_id)
        out = sequence_logps(model, batch)  # chosen and rejected rows alike: both are targets
        loss = -out.logps.sum() / out.tokens.sum()  # mean NLL per response token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(model_dir))
    return loss.item()
