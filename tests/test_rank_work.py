"""Work dealt to ranks by token count: every item once, balanced within one item, the same deal
for the same inputs."""

from __future__ import annotations

import random

import pytest

from lora_dpo.rank_work import balanced_assignment


def loads(tokens: list[int], shares: list[list[int]]) -> list[int]:
    return [sum(tokens[i] for i in share) for share in shares]


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_every_item_once_and_loads_within_the_largest_item(ranks):
    rng = random.Random(ranks)
    for _ in range(200):
        tokens = [rng.choice([1, 7, 50, 300, 2000]) * rng.randint(1, 9) for _ in range(rng.randint(0, 40))]
        shares = balanced_assignment(tokens, ranks)
        assert len(shares) == ranks
        assert sorted(i for share in shares for i in share) == list(range(len(tokens)))
        assert all(share == sorted(share) for share in shares)  # the planned order kept
        load = loads(tokens, shares)
        assert max(load) - min(load) <= max(tokens, default=0)


def test_one_rank_takes_everything_in_order():
    assert balanced_assignment([5, 1, 9, 3], 1) == [[0, 1, 2, 3]]


def test_longest_first_to_the_least_loaded_rank():
    # 9 -> rank 0; 8 -> rank 1; 5 -> rank 1 (8 < 9); 3 -> rank 0 (9 < 13); 2 -> rank 0 (12 < 13)
    assert balanced_assignment([3, 9, 2, 8, 5], 2) == [[0, 1, 2], [3, 4]]


def test_round_robin_from_longest_first_is_beaten():
    """The deal this replaces (every rank-th shard of the plan: each split longest first) gives
    rank 0 the larger shard of every round; by tokens the ranks end closer."""
    tokens = [100, 90, 80, 50]  # three train shards, one eval shard
    old = [list(range(len(tokens)))[rank::2] for rank in range(2)]
    assert loads(tokens, old) == [180, 140]
    assert balanced_assignment(tokens, 2) == [[0, 3], [1, 2]]
    assert loads(tokens, balanced_assignment(tokens, 2)) == [150, 170]


def test_the_same_inputs_give_the_same_deal():
    tokens = [4, 4, 4, 4, 2, 2, 7, 7, 1]  # ties everywhere: broken by index and rank
    deals = {tuple(map(tuple, balanced_assignment(list(tokens), 3))) for _ in range(20)}
    assert deals == {((2, 6, 8), (3, 7), (0, 1, 4, 5))}


def test_more_ranks_than_items_leaves_some_idle():
    assert balanced_assignment([3, 5], 4) == [[1], [0], [], []]
    assert balanced_assignment([], 2) == [[], []]


def test_no_ranks_is_refused():
    with pytest.raises(ValueError, match="ranks=0"):
        balanced_assignment([1], 0)
