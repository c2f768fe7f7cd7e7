"""Work dealt to the ranks of a torchrun job by its token count, so that none lags the others.

Precompute deals its shards and eval its batches this way; every rank computes the same deal
from the same inputs, so no rank has to send it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def balanced_assignment(tokens: Sequence[int], ranks: int) -> list[list[int]]:
    """The items (by index into `tokens`, each its token count) of each of `ranks` ranks.

    Longest-processing-time greedy: from the largest item down (ties: the lower index first),
    each goes to the rank with the fewest tokens so far (ties: the lower rank). Deterministic,
    and balanced within one item: the most loaded rank was the least loaded when it took its
    last item, so max load - min load <= the largest item's tokens. Each rank's items come in
    ascending index order (the order the work was planned in); one rank takes all of them.
    """
    if ranks < 1:
        raise ValueError(f"ranks={ranks}: need at least one")
    shares: list[list[int]] = [[] for _ in range(ranks)]
    loads = [(0, rank) for rank in range(ranks)]  # a heap of (tokens so far, rank)
    for item in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(item)
        heapq.heappush(loads, (load + tokens[item], rank))
    return [sorted(share) for share in shares]
