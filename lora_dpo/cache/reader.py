"""A complete cache loaded into memory (a few bytes per pair), checked, and aligned with a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo.cache.entries import ShardEntry
from lora_dpo.cache.format import (
    REBUILD_HINT,
    SHARED_PREFIX_FIELDS,
    ShardRecords,
    read_shard,
    shard_fields,
    shard_path,
    value_problems,
)
from lora_dpo.cache.manifest import Manifest
from lora_dpo.errors import CacheError
from lora_dpo.fileio import sha256_file


@dataclass(frozen=True)
class ReferenceValues:
    """Reference values of a run's pairs, row i for pairs[i]: indexed by pair index, no hashing."""

    chosen_logps: torch.Tensor  # [N] fp32
    rejected_logps: torch.Tensor  # [N] fp32
    chosen_tokens: torch.Tensor  # [N] int32
    rejected_tokens: torch.Tensor  # [N] int32
    # [N] fp32 each, when asked for (LD-DPO): log-probs of each response's shared prefix
    shared_prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.chosen_logps)

    def logps(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) for the pairs at these indices."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.chosen_logps[rows], self.rejected_logps[rows]

    def shared_logps(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) log-probs of the responses' first min(|yw|, |yl|) tokens."""
        assert self.shared_prefix is not None, "opened without shared_prefix"
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.shared_prefix[0][rows], self.shared_prefix[1][rows]


def load_listed_shard(
    cache_dir: Path, entry: ShardEntry, verify_checksum: bool = True, extras: bool = False
) -> ShardRecords:
    """One shard of the manifest, checked against its recorded checksum, pair count and fields
    (its extra fields loaded only with `extras`)."""
    path = shard_path(cache_dir, entry.file)
    if not path.is_file():
        raise CacheError(f"{path}: shard listed in the manifest is missing")
    if verify_checksum and sha256_file(path) != entry.sha256:
        raise CacheError(f"{path}: checksum mismatch, the shard is truncated or altered")
    fields = shard_fields(path)
    if fields != entry.fields:
        raise CacheError(
            f"{path}: holds fields {', '.join(fields)}; the manifest lists {', '.join(entry.fields)}"
        )
    records = read_shard(path, extras=extras)
    if len(records.pair_hashes) != entry.pairs:
        raise CacheError(f"{path}: holds {len(records.pair_hashes)} pairs, manifest says {entry.pairs}")
    return records


class ReferenceCache:
    """A complete cache on disk, loaded into memory and indexed by pair hash. Needs no lock:
    writers only add files and replace the manifest atomically.

    Opening it checks every value: a NaN or a positive log-prob is refused here, with the
    shard named, instead of surfacing later as skipped training steps. With `shared_prefix`
    it also loads the shared-prefix log-probs (SHARED_PREFIX_FIELDS) of the shards that hold them.
    """

    def __init__(self, cache_dir: str | Path, *, verify_checksums: bool = True, shared_prefix: bool = False):
        self.cache_dir = Path(cache_dir)
        self.manifest = Manifest.read(self.cache_dir)
        parts = []
        for entry in self.manifest.shards:
            wanted = shared_prefix and all(name in entry.fields for name in SHARED_PREFIX_FIELDS)
            records = load_listed_shard(self.cache_dir, entry, verify_checksums, extras=wanted)
            problems = value_problems(shard_path(self.cache_dir, entry.file), records)
            if problems:
                raise CacheError(f"{problems[0]}; {REBUILD_HINT}")
            parts.append(records)
        self.pair_hashes = [h for part in parts for h in part.pair_hashes]
        self.chosen_logps = torch.cat([p.chosen_logps for p in parts])  # [N]
        self.rejected_logps = torch.cat([p.rejected_logps for p in parts])  # [N]
        self.chosen_tokens = torch.cat([p.chosen_tokens for p in parts])  # [N]
        self.rejected_tokens = torch.cat([p.rejected_tokens for p in parts])  # [N]
        # ([N], [N]) shared-prefix log-probs, NaN for the pairs of shards without them
        self.shared_prefix = None
        if shared_prefix:
            self.shared_prefix = tuple(
                torch.cat([p.extras.get(name, torch.full((len(p),), torch.nan)) for p in parts])
                for name in SHARED_PREFIX_FIELDS
            )
        self.row_of = {pair_hash: row for row, pair_hash in enumerate(self.pair_hashes)}

    def __len__(self) -> int:
        return len(self.pair_hashes)

    def aligned(self, pairs: Sequence[Any], what: str) -> ReferenceValues:
        """The values of `pairs` (TokenizedPair) in their order; every pair must be in the
        cache, else the first missing ones are named by their source rows."""
        rows = [self.row_of.get(p.pair_hash) for p in pairs]
        missing = [p.source_index for p, row in zip(pairs, rows) if row is None]
        if missing:
            raise CacheError(
                f"{self.cache_dir}: {len(missing)} of {len(pairs)} {what} pairs are not in "
                f"the reference cache (source rows {missing[:5]}...); run precompute-ref on this "
                "data (it scores only the pairs the cache lacks)"
            )
        index = torch.tensor(rows, dtype=torch.long)  # [N]
        shared = None
        if self.shared_prefix is not None:
            chosen, rejected = (values[index] for values in self.shared_prefix)
            lacking = int(torch.isnan(chosen).sum())
            if lacking:
                raise CacheError(
                    f"{self.cache_dir}: {lacking} of {len(pairs)} {what} pairs lack the shared-prefix reference "
                    f"log-probs that train.ld_alpha < 1 reads ({', '.join(SHARED_PREFIX_FIELDS)}: their shards "
                    "were written without them); rebuild the cache with precompute-ref --rebuild and this "
                    "train.ld_alpha"
                )
            shared = (chosen, rejected)
        return ReferenceValues(
            self.chosen_logps[index],
            self.rejected_logps[index],
            self.chosen_tokens[index],
            self.rejected_tokens[index],
            shared,
        )
