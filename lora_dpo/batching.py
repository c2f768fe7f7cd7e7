"""Turn tokenized pairs into batches, and order pairs into batches.

Chosen and rejected go through the model in one forward. `collate` stacks them as [2B, T]:
rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones, in the same pair order.
`collate_packed` (prefix sharing) puts each pair in one row, prompt + chosen + rejected, so the
prompt is forwarded once; a block mask keeps rejected from seeing chosen and position ids
restart after the prompt, which gives every response token the context it has unshared.
Either batch names its response tokens the same way (`response_tokens`): sequence s of the
2B is chosen of pair s for s < B, rejected of pair s - B otherwise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

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

    @property
    def sequence_tokens(self) -> int:
        """Real tokens of the 2B sequences (the prompt counted once per response)."""
        return int(self.attention_mask.sum())

    def response_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predictors, targets, rows), each [N]: the flat index into [2B * T] of the hidden
        state that predicts each response token (position t predicts token t+1), the token,
        and its sequence."""
        targets = self.labels[:, 1:]  # [2B, T-1]
        rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # [N], row-major
        return rows * self.labels.shape[1] + columns, targets[rows, columns], rows

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pair_hashes,
            self.source_indices,
        )


# Segment ids of a packed row.
PAD_SEGMENT, PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT = -1, 0, 1, 2


@dataclass
class PackedPairBatch:
    """B pairs, one row each: prompt + chosen + rejected, right-padded to the longest row."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L] 0..P+C-1 over prompt + chosen, then P..P+R-1 over rejected
    segments: torch.Tensor  # [B, L] PROMPT_SEGMENT / CHOSEN_SEGMENT / REJECTED_SEGMENT / PAD_SEGMENT
    predictors: torch.Tensor  # [N] flat index into [B * L] of the hidden state predicting each token
    targets: torch.Tensor  # [N] response token ids
    rows: torch.Tensor  # [N] sequence of each token: pair b's chosen is b, its rejected B + b
    pair_hashes: list[bytes]  # [B]
    source_indices: list[int]  # [B]
    sequence_tokens: int  # real tokens of the 2B unshared sequences, for tokens/s

    @property
    def num_pairs(self) -> int:
        return len(self.pair_hashes)

    def response_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.predictors, self.targets, self.rows

    def visibility(self) -> torch.Tensor:
        """[B, L, L] bool, query x key: causal, and a response sees the prompt and itself only
        (rejected never sees chosen). A padding query sees itself, so no softmax row is empty."""
        length = self.segments.shape[1]
        query, key = self.segments.unsqueeze(2), self.segments.unsqueeze(1)  # [B, L, 1], [B, 1, L]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segments.device).tril_()
        same_or_prompt = (key == PROMPT_SEGMENT) | (key == query)
        visible = causal & same_or_prompt & (query != PAD_SEGMENT) & (key != PAD_SEGMENT)
        return visible | torch.eye(length, dtype=torch.bool, device=self.segments.device)

    def to(self, device: torch.device) -> "PackedPairBatch":
        return PackedPairBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.segments.to(device),
            self.predictors.to(device),
            self.targets.to(device),
            self.rows.to(device),
            self.pair_hashes,
            self.source_indices,
            self.sequence_tokens,
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


def collate_packed(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairBatch:
    """Prefix sharing: one row per pair, padded to the batch's longest `P + C + R`.

    Response tokens are listed in the order `collate` gives them (every chosen sequence, then
    every rejected one, each by position), and a token is scored exactly when it is in the
    unshared layout: there, the one at sequence position 0 has nothing to predict it.
    """
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)  # [B, L]
    position_ids = torch.zeros((len(pairs), width), dtype=torch.long)
    segments = torch.full((len(pairs), width), PAD_SEGMENT, dtype=torch.long)
    chosen_tokens: list[tuple[int, int, int]] = []  # (predictor, target, row)
    rejected_tokens: list[tuple[int, int, int]] = []
    for b, pair in enumerate(pairs):
        prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        length = prompt + chosen + rejected
        input_ids[b, :length] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        position_ids[b, : prompt + chosen] = torch.arange(prompt + chosen)
        position_ids[b, prompt + chosen : length] = torch.arange(prompt, prompt + rejected)
        segments[b, :prompt] = PROMPT_SEGMENT
        segments[b, prompt : prompt + chosen] = CHOSEN_SEGMENT
        segments[b, prompt + chosen : length] = REJECTED_SEGMENT
        row_start = b * width
        for j, token in enumerate(pair.chosen_ids):  # at packed index prompt + j
            if prompt + j >= 1:
                chosen_tokens.append((row_start + prompt + j - 1, token, b))
        for k, token in enumerate(pair.rejected_ids):  # at packed index prompt + chosen + k
            if prompt + k >= 1:
                # its first token continues the prompt, the rest continue the rejected tokens
                predictor = prompt - 1 if k == 0 else prompt + chosen + k - 1
                rejected_tokens.append((row_start + predictor, token, len(pairs) + b))
    columns = torch.tensor(chosen_tokens + rejected_tokens, dtype=torch.long).reshape(-1, 3)  # [N, 3]
    predictors, targets, rows = (column.contiguous() for column in columns.unbind(1))
    return PackedPairBatch(
        input_ids,
        position_ids,
        segments,
        predictors,
        targets,
        rows,
        [p.pair_hash for p in pairs],
        [p.source_index for p in pairs],
        sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
    )


def pad_id_of(tokenizer: Any) -> int:
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
