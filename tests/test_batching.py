"""Batches: padding to the batch's longest pair, length-sorted and length-grouped orders (every
pair exactly once, deterministic per seed, far less padding than random batches), the
prompt-shared and packed layouts, and micro-batches by token budget."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_dpo.batching import (
    CHOSEN_SEGMENT,
    IGNORE_INDEX,
    LAYOUTS,
    PAD_DOCUMENT,
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    REJECTED_SEGMENT,
    batch_tokens,
    collate,
    collate_packed,
    collate_prompt_shared,
    length_grouped_batches,
    length_sorted_batches,
    packed_length,
    pair_length,
    token_budget_batches,
)
from lora_dpo.data import TokenizedPair


def make_pairs(count: int, seed: int = 0, prompt=(2, 200), response=(1, 300)) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(bounds):
        return tuple(rng.randrange(3, 1000) for _ in range(rng.randint(*bounds)))

    return [TokenizedPair(ids(prompt), ids(response), ids(response), i) for i in range(count)]


def padding_fraction(pairs, batches) -> float:
    """Share of the [2B, T] cells of all batches that are padding."""
    cells = real = 0
    for indices in batches:
        batch = collate([pairs[i] for i in indices], pad_id=0)
        cells += batch.attention_mask.numel()
        real += int(batch.attention_mask.sum())
    return 1 - real / cells


def test_collate_pads_to_the_longest_pair_with_masks_from_lengths():
    pad = 2  # the pad id also occurs as a real token: masks must come from lengths
    pairs = [TokenizedPair((1, 2), (2, 2, 9), (5,), 0), TokenizedPair((1,), (7,), (8, 2), 1)]
    batch = collate(pairs, pad_id=pad)
    assert batch.input_ids.shape == (4, 5)  # the longest sequence, 2 + 3, not max_length
    assert batch.input_ids.tolist() == [
        [1, 2, 2, 2, 9],
        [1, 7, pad, pad, pad],
        [1, 2, 5, pad, pad],
        [1, 8, 2, pad, pad],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    no = IGNORE_INDEX
    assert batch.labels.tolist() == [
        [no, no, 2, 2, 9],
        [no, 7, no, no, no],
        [no, no, 5, no, no],
        [no, 8, 2, no, no],
    ]
    assert batch.sequence_tokens == 5 + 2 + 3 + 3
    predictors, targets, rows = batch.response_tokens()
    assert targets.tolist() == [2, 2, 9, 7, 5, 8, 2]
    assert rows.tolist() == [0, 0, 0, 1, 2, 3, 3]
    # position t predicts token t+1: flat index row * T + t
    assert predictors.tolist() == [1, 2, 3, 5, 11, 15, 16]


def test_length_sorted_batches_cover_every_pair_longest_first():
    pairs = make_pairs(103)
    batches = length_sorted_batches(pairs, batch_size=8)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(103))
    assert [len(b) for b in batches] == [8] * 12 + [7]
    lengths = [pair_length(pairs[i]) for i in order]
    assert lengths == sorted(lengths, reverse=True)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=120),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_length_grouped_batches_use_every_pair_exactly_once(lengths, batch_size, seed):
    pairs = [TokenizedPair((1,), (2,) * n, (3,), i) for i, n in enumerate(lengths)]
    batches = length_grouped_batches(pairs, batch_size, seed)
    assert sorted(i for batch in batches for i in batch) == list(range(len(pairs)))
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert sum(len(batch) < batch_size for batch in batches) <= -(-len(pairs) // (batch_size * 16))


def test_length_grouped_batches_are_deterministic_per_seed_and_shuffled():
    pairs = make_pairs(400)
    first = length_grouped_batches(pairs, 4, seed=7)
    assert first == length_grouped_batches(pairs, 4, seed=7)
    assert first != length_grouped_batches(pairs, 4, seed=8)
    # still shuffled: batch lengths are not in sorted order across the epoch
    means = [sum(pair_length(pairs[i]) for i in batch) / len(batch) for batch in first]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_grouping_cuts_padding_far_below_random_batches():
    pairs = make_pairs(512, seed=1)
    rng = random.Random(0)
    shuffled = list(range(len(pairs)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 4] for i in range(0, len(shuffled), 4)]
    # A pair's shorter response is padded to its longer one whatever the batching: the floor.
    floor = padding_fraction(pairs, [[i] for i in range(len(pairs))])
    grouped = padding_fraction(pairs, length_grouped_batches(pairs, 4, seed=0)) - floor
    sorted_ = padding_fraction(pairs, length_sorted_batches(pairs, 4)) - floor
    random_ = padding_fraction(pairs, random_batches) - floor
    assert random_ > 0.15  # lengths vary a lot in this data
    assert grouped < 0.2 * random_
    assert sorted_ <= grouped


def test_prompt_shared_layout():
    """Prompt once, then chosen, then rejected; positions restart after the prompt; each response
    token is predicted by the hidden state that precedes it in its own unshared sequence."""
    pairs = [TokenizedPair((1, 2, 3), (4, 5), (6, 7, 8), 0), TokenizedPair((9,), (10,), (11,), 1)]
    batch = collate_prompt_shared(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch.position_ids[1, :3].tolist() == [0, 1, 1]
    P, C, R, X = PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT, PAD_SEGMENT
    assert batch.segments.tolist() == [[P, P, P, C, C, R, R, R], [P, C, R, X, X, X, X, X]]
    assert batch.targets.tolist() == [4, 5, 10, 6, 7, 8, 11]
    assert batch.sequences.tolist() == [0, 0, 1, 2, 2, 2, 3]
    # rejected's first token continues the prompt (index 2), not the chosen tokens
    assert batch.predictors.tolist() == [2, 3, 8 + 0, 2, 5, 6, 8 + 0]
    assert batch.sequence_tokens == (2 * 3 + 2 + 3) + (2 * 1 + 1 + 1)
    assert batch.num_pairs == 2


def test_prompt_shared_visibility_keeps_rejected_from_chosen():
    batch = collate_prompt_shared(
        [TokenizedPair((1, 2), (3, 4), (5, 6), 0), TokenizedPair((1,), (3,), (5,), 1)], 0
    )
    visible = batch.visibility()[0].int().tolist()  # query x key
    assert visible == [
        [1, 0, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen: prompt + chosen so far
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected: prompt + rejected so far, never chosen
        [1, 1, 0, 0, 1, 1],
    ]
    padded = batch.visibility()[1].int()
    assert padded[3:, :].tolist() == [
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]  # pads: self only
    assert padded[:3, 3:].sum() == 0  # nothing real sees a pad


@pytest.mark.parametrize("shared", [collate_prompt_shared, collate_packed], ids=["prompt_shared", "packed"])
def test_shared_layouts_and_padded_name_the_same_tokens_in_the_same_order(shared):
    pairs = make_pairs(5, seed=3, prompt=(1, 6), response=(1, 6)) + [TokenizedPair((), (4, 5), (6,), 9)]
    unshared, packed = collate(pairs, 0), shared(pairs, 0)
    _, targets, sequences = unshared.response_tokens()
    assert torch.equal(packed.targets, targets) and torch.equal(packed.sequences, sequences)
    assert packed.sequence_tokens == unshared.sequence_tokens
    # the token each predictor sits on is the one before the target in its own sequence
    flat = packed.input_ids.reshape(-1)
    unshared_flat = unshared.input_ids.reshape(-1)
    torch.testing.assert_close(flat[packed.predictors], unshared_flat[unshared.response_tokens()[0]])


def test_packed_layout_puts_every_pair_in_one_row_without_padding():
    pairs = [TokenizedPair((1, 2, 3), (4, 5), (6, 7, 8), 0), TokenizedPair((9,), (10,), (11,), 1)]
    batch = collate_packed(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert batch.computed_tokens == sum(map(packed_length, pairs)) == 11
    # positions restart per pair; rejected continues from the prompt's end, as chosen does
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]]
    assert batch.documents.tolist() == [[0] * 8 + [1] * 3]
    P, C, R = PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT
    assert batch.segments.tolist() == [[P, P, P, C, C, R, R, R, P, C, R]]
    assert batch.spans == [(0, 0, 8), (0, 8, 11)]
    assert batch.targets.tolist() == [4, 5, 10, 6, 7, 8, 11]
    assert batch.sequences.tolist() == [0, 0, 1, 2, 2, 2, 3]
    # pair 1's tokens are predicted from pair 1's own positions (8 = its prompt)
    assert batch.predictors.tolist() == [2, 3, 8, 2, 5, 6, 8]
    assert PAD_DOCUMENT not in batch.documents


def test_packed_visibility_keeps_pairs_apart_and_rejected_from_chosen():
    batch = collate_packed([TokenizedPair((1, 2), (3,), (5,), 0), TokenizedPair((1,), (3,), (5, 6), 1)], 0)
    visible = batch.visibility()[0].int().tolist()  # query x key
    assert visible == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # pair 0: prompt
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # chosen
        [1, 1, 0, 1, 0, 0, 0, 0],  # rejected: the prompt, not chosen
        [0, 0, 0, 0, 1, 0, 0, 0],  # pair 1: its prompt sees nothing of pair 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 1, 0, 1, 1],
    ]
    # a window of 2 positions: rejected's second token (position 2) no longer sees the prompt's 0
    windowed = batch.visibility(sliding_window=2)[0].int()
    assert windowed[7].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert windowed[3].tolist() == [0, 1, 0, 1, 0, 0, 0, 0]


def test_batch_tokens_count_what_each_layout_runs():
    pairs = [TokenizedPair((1, 2, 3), (4, 5), (6, 7, 8), 0), TokenizedPair((9,), (10,), (11,), 1)]
    layouts = {"padded": collate, "prompt_shared": collate_prompt_shared, "packed": collate_packed}
    assert set(layouts) == set(LAYOUTS)
    for layout, collate_fn in layouts.items():
        assert batch_tokens(layout, pairs) == collate_fn(pairs, 0).computed_tokens
    assert batch_tokens("padded", pairs) == 2 * 2 * 6
    assert batch_tokens("prompt_shared", pairs) == 2 * 8
    assert batch_tokens("packed", pairs) == 8 + 3


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=40
    ),
    budget=st.integers(1, 200),
    layout=st.sampled_from(LAYOUTS),
)
def test_token_budget_batches_keep_order_and_budget(lengths, budget, layout):
    pairs = [TokenizedPair((1,) * p, (2,) * c, (3,) * r, i) for i, (p, c, r) in enumerate(lengths)]
    indices = list(range(len(pairs)))[::-1]
    batches = token_budget_batches(pairs, indices, layout, budget)
    assert [i for batch in batches for i in batch] == indices  # every pair once, in the given order
    for batch in batches:
        tokens = batch_tokens(layout, [pairs[i] for i in batch])
        assert tokens <= budget or len(batch) == 1  # a pair over the budget goes alone
    for first, second in zip(batches, batches[1:]):  # greedy: the next pair did not fit
        assert batch_tokens(layout, [pairs[i] for i in first + second[:1]]) > budget


def test_token_budget_fills_micro_batches_by_tokens_not_pairs():
    short = [TokenizedPair((1,) * 10, (2,) * 10, (3,) * 10, i) for i in range(8)]  # 30 tokens packed
    long = [TokenizedPair((1,) * 100, (2,) * 100, (3,) * 100, 8 + i) for i in range(2)]  # 300
    pairs = short + long
    batches = token_budget_batches(pairs, range(10), "packed", 300)
    assert [len(batch) for batch in batches] == [8, 1, 1]
