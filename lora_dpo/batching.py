"""Turn tokenized pairs into batches, and order pairs into batches.

Chosen and rejected go through the model in one forward, in one of three layouts (LAYOUTS):

- padded (`collate`): [2B, T], rows 0..B-1 the chosen sequences and B..2B-1 the rejected ones
  in the same pair order, each prompt + response, right-padded to the longest;
- prompt_shared (`collate_prompt_shared`): [B, L], one row per pair, prompt + chosen +
  rejected, right-padded to the longest pair: the prompt is forwarded once;
- packed (`collate_packed`): [1, L], every pair of the batch in one row, each as prompt +
  chosen + rejected, with no padding at all.

In the last two a pair's tokens carry their pair (`documents`), their part (`segments`) and the
position they have unshared: rejected positions continue from the prompt's end, as chosen
ones do. The attention (lora_dpo.attention) keeps pairs apart and rejected from chosen, which
gives every response token exactly the context it has in the padded layout.
Every batch names its response tokens the same way (`response_tokens`): sequence s of the 2B
is chosen of pair s for s < B, rejected of pair s - B otherwise.

A batch is made on the host with every index tensor it needs (which hidden state predicts each
response token, its target, its sequence, the token count of each sequence): derived on a
GPU (nonzero, bincount) they would make the host wait for it on every micro-batch. `to` moves
a batch without such a wait (`to_device`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.data import TokenizedPair

IGNORE_INDEX = -100
LAYOUTS = ("padded", "prompt_shared", "packed")


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, T] prompt + response, right-padded
    attention_mask: torch.Tensor  # [2B, T] 1 on real tokens, from lengths (pad may equal eos)
    labels: torch.Tensor  # [2B, T] response token ids, IGNORE_INDEX on prompt and padding
    pair_hashes: list[bytes]  # [B]
    source_indices: list[int]  # [B]
    # The response tokens (`response_tokens`) and their count per sequence: derived from the
    # labels when the batch is made on the host, carried along by `to`.
    predictors: torch.Tensor | None = None  # [N]
    targets: torch.Tensor | None = None  # [N]
    sequences: torch.Tensor | None = None  # [N]
    tokens: torch.Tensor | None = None  # [2B]

    def __post_init__(self) -> None:
        if self.predictors is None:
            shifted = self.labels[:, 1:]  # [2B, T-1]
            rows, columns = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)  # [N], row-major
            self.predictors = rows * self.labels.shape[1] + columns
            self.targets, self.sequences = shifted[rows, columns], rows
        if self.tokens is None:
            assert self.sequences is not None
            self.tokens = response_counts(self.sequences, len(self.labels))

    @property
    def num_pairs(self) -> int:
        return len(self.pair_hashes)

    @property
    def sequence_tokens(self) -> int:
        """Real tokens of the 2B sequences (the prompt counted once per response)."""
        return int(self.attention_mask.sum())

    @property
    def computed_tokens(self) -> int:
        """Token positions the decoder runs, padding included."""
        return self.input_ids.numel()

    def response_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predictors, targets, sequences), each [N]: the flat index into [2B * T] of the
        hidden state that predicts each response token (position t predicts token t+1), the
        token, and its sequence."""
        assert self.predictors is not None and self.targets is not None and self.sequences is not None
        return self.predictors, self.targets, self.sequences

    def to(self, device: torch.device) -> PairBatch:
        return moved(self, device)


# Segment ids of a packed row, and the document id of its padding.
PAD_SEGMENT, PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT = -1, 0, 1, 2
PAD_DOCUMENT = -1


@dataclass
class PackedPairBatch:
    """B pairs as prompt + chosen + rejected: all in one row, or one per row (right-padded)."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L] per pair: 0..P+C-1 over prompt + chosen, P..P+R-1 over rejected
    documents: torch.Tensor  # [R, L] the pair (0..B-1) of each token, PAD_DOCUMENT on padding
    segments: torch.Tensor  # [R, L] PROMPT_SEGMENT / CHOSEN_SEGMENT / REJECTED_SEGMENT / PAD_SEGMENT
    predictors: torch.Tensor  # [N] flat index into [R * L] of the hidden state predicting each token
    targets: torch.Tensor  # [N] response token ids
    sequences: torch.Tensor  # [N] sequence of each token: pair b's chosen is b, its rejected B + b
    spans: list[tuple[int, int, int]]  # [B] (row, start, end) of each pair's tokens
    heads: list[tuple[int, int]]  # [B] (prompt, chosen) tokens of each pair, known on the host
    pair_hashes: list[bytes]  # [B]
    source_indices: list[int]  # [B]
    sequence_tokens: int  # real tokens of the 2B unshared sequences, for tokens/s
    tokens: torch.Tensor | None = None  # [2B] response tokens per sequence, counted on the host

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = response_counts(self.sequences, 2 * self.num_pairs)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_hashes)

    @property
    def computed_tokens(self) -> int:
        """Token positions the decoder runs, padding included (none when packed)."""
        return self.input_ids.numel()

    def response_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.predictors, self.targets, self.sequences

    def visibility(self, sliding_window: int | None = None) -> torch.Tensor:
        """[R, L, L] bool, query x key, as a dense matrix: see `visible`."""
        index = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        query = (self.documents.unsqueeze(2), self.segments.unsqueeze(2), self.position_ids.unsqueeze(2))
        key = (self.documents.unsqueeze(1), self.segments.unsqueeze(1), self.position_ids.unsqueeze(1))
        return visible(query, key, index.view(1, -1, 1), index.view(1, 1, -1), sliding_window)

    def to(self, device: torch.device) -> PackedPairBatch:
        return moved(self, device)


def response_counts(sequences: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[N] sequence of each response token -> [S] tokens per sequence (on the host, with the batch)."""
    return torch.bincount(sequences, minlength=num_sequences)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, without making the host wait. From pageable memory a host-to-GPU
    copy first waits for the stream (every kernel queued so far); from pinned memory it is
    queued like a kernel, ahead of the kernels that read it. Pinning exists on CUDA only."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def moved(batch: Any, device: torch.device) -> Any:
    """A PairBatch or PackedPairBatch with every tensor on `device` (`to_device`)."""
    tensors = {
        field.name: to_device(value, device)
        for field in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, field.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **tensors)


TokenIds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (document, segment, position)


def visible(
    query: TokenIds,
    key: TokenIds,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor:
    """Whether a query token sees a key token in a packed row: THE rule, evaluated densely
    (`PackedPairBatch.visibility`), per pair, or per block by FlexAttention's mask_mod.

    Causal, within one pair, and a response sees the prompt and itself only (rejected never
    sees chosen). With a sliding window, as transformers slides: the key's position is less
    than `sliding_window` before the query's. A padding token sees itself only, so no softmax
    row is empty and nothing real sees a pad.
    """
    (query_document, query_segment, query_position), (key_document, key_segment, key_position) = query, key
    allowed = (query_document == key_document) & (query_document != PAD_DOCUMENT) & (query_index >= key_index)
    allowed = allowed & ((key_segment == PROMPT_SEGMENT) | (key_segment == query_segment))
    if sliding_window is not None:
        allowed = allowed & (query_position - key_position < sliding_window)
    return allowed | (query_index == key_index)


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Padded layout: pad to the batch's longest sequence (not to max_length); masks come from lengths."""
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


def collate_prompt_shared(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairBatch:
    """Prompt-shared layout: one row per pair, right-padded to the batch's longest `P + C + R`."""
    return collate_rows(pairs, pad_id, [[b] for b in range(len(pairs))])


def collate_packed(pairs: Sequence[TokenizedPair], pad_id: int) -> PackedPairBatch:
    """Packed layout: every pair in one row, `sum(P + C + R)` tokens, no padding."""
    return collate_rows(pairs, pad_id, [list(range(len(pairs)))])


def collate_rows(
    pairs: Sequence[TokenizedPair], pad_id: int, rows: Sequence[Sequence[int]]
) -> PackedPairBatch:
    """Pairs placed in rows (`rows[r]`: the pairs of row r, in order), right-padded to the longest.

    Response tokens are listed in the order `collate` gives them (every chosen sequence, then
    every rejected one, each by position), and a token is scored exactly when it is in the
    padded layout: there, the one at sequence position 0 has nothing to predict it.
    """
    assert sorted(b for row in rows for b in row) == list(range(len(pairs))), "each pair in one row"
    width = max(sum(packed_length(pairs[b]) for b in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # [R, L]
    position_ids = torch.zeros(shape, dtype=torch.long)
    documents = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    segments = torch.full(shape, PAD_SEGMENT, dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(pairs)
    heads = [(len(p.prompt_ids), len(p.chosen_ids)) for p in pairs]
    chosen_tokens: list[tuple[int, int, int]] = []  # (predictor, target, sequence)
    rejected_tokens: list[tuple[int, int, int]] = []
    for r, row in enumerate(rows):
        start = 0
        for b in row:
            pair = pairs[b]
            prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + prompt + chosen + rejected
            input_ids[r, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[r, start : start + prompt + chosen] = torch.arange(prompt + chosen)
            position_ids[r, start + prompt + chosen : end] = torch.arange(prompt, prompt + rejected)
            documents[r, start:end] = b
            segments[r, start : start + prompt] = PROMPT_SEGMENT
            segments[r, start + prompt : start + prompt + chosen] = CHOSEN_SEGMENT
            segments[r, start + prompt + chosen : end] = REJECTED_SEGMENT
            spans[b] = (r, start, end)
            first = r * width + start  # flat index of the pair's first token
            for j, token in enumerate(pair.chosen_ids):  # at first + prompt + j
                if prompt + j >= 1:
                    chosen_tokens.append((first + prompt + j - 1, token, b))
            for k, token in enumerate(pair.rejected_ids):  # at first + prompt + chosen + k
                if prompt + k >= 1:
                    # its first token continues the prompt, the rest continue the rejected tokens
                    predictor = prompt - 1 if k == 0 else prompt + chosen + k - 1
                    rejected_tokens.append((first + predictor, token, len(pairs) + b))
            start = end
    chosen_tokens.sort(key=lambda token: token[2])  # pair order, each pair's tokens by position
    rejected_tokens.sort(key=lambda token: token[2])
    columns = torch.tensor(chosen_tokens + rejected_tokens, dtype=torch.long).reshape(-1, 3)  # [N, 3]
    predictors, targets, sequences = (column.contiguous() for column in columns.unbind(1))
    return PackedPairBatch(
        input_ids,
        position_ids,
        documents,
        segments,
        predictors,
        targets,
        sequences,
        spans,
        heads,
        [p.pair_hash for p in pairs],
        [p.source_index for p in pairs],
        sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
    )


COLLATE: dict[str, Callable[[Sequence[TokenizedPair], int], PairBatch | PackedPairBatch]] = {
    "padded": collate,
    "prompt_shared": collate_prompt_shared,
    "packed": collate_packed,
}


def pad_id_of(tokenizer: Any) -> int:
    """Any id works as padding, since masks come from lengths; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pair_length(pair: TokenizedPair) -> int:
    """The longer of the pair's two sequences, prompt + response."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def packed_length(pair: TokenizedPair) -> int:
    """The pair as one run of tokens: prompt once, then both responses."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def batch_tokens(layout: str, pairs: Sequence[TokenizedPair]) -> int:
    """Token positions the decoder runs for these pairs in `layout`, padding included."""
    if layout == "padded":
        return 2 * len(pairs) * max(map(pair_length, pairs))
    if layout == "prompt_shared":
        return len(pairs) * max(map(packed_length, pairs))
    assert layout == "packed", f"unknown layout {layout!r}"
    return sum(map(packed_length, pairs))


def token_budget_batches(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], layout: str, max_tokens: int
) -> list[list[int]]:
    """`indices` cut, in order, into micro-batches of at most `max_tokens` decoder tokens in
    `layout` (`batch_tokens`). A pair that alone exceeds the budget goes alone."""
    batches: list[list[int]] = []
    for i in indices:
        if batches and batch_tokens(layout, [pairs[j] for j in batches[-1]] + [pairs[i]]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


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
