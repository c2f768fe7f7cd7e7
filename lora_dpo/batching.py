"""Turn tokenized pairs into padded [2B, T] batches, and order pairs into batches.

Chosen and rejected go through the model in one forward: rows 0..B-1 are the chosen
sequences, rows B..2B-1 the rejected ones, in the same pair order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from lora_dpo.data import TokenizedPair

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, T] prompt + response, right-padded
    attention_mask: torch.Tensor  # [2B, T] 1 on real tokens, from lengths (pad may equal eos)
    labels: torch.Tensor  # [2B, T] response token ids, IGNORE_INDEX on prompt and padding
    pair_hashes: list[bytes]  # [B]
    source_indices: list[int]  # [B]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_hashes)

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pair_hashes,
            self.source_indices,
        )


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Pad to the batch's longest sequence (not to max_length); masks come from lengths."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [2B, T]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(response, dtype=torch.long)
    return PairBatch(
        input_ids,
        attention_mask,
        labels,
        [p.pair_hash for p in pairs],
        [p.source_index for p in pairs],
    )


def pad_id_of(tokenizer) -> int:
    """Any id works as padding, since masks come from lengths; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pair_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def length_sorted_batches(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first, so an out-of-memory shows at once)."""
    order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, seed: int, group_batches: int = 16
) -> list[list[int]]:
    """Shuffled batches of similar-length pairs, so padding stays small.

    Shuffle all pairs, sort within windows of `group_batches` batches by length, cut into
    batches, then shuffle the batches: random order, little padding, deterministic per seed.
    """
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: pair_length(pairs[i]))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
