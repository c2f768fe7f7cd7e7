"""The reference cache on disk, format v1: its names, its shards, and what a sound value is.

    <cache>/manifest.json              written last: its presence marks a complete cache
    <cache>/config.yaml                the config it was built with
    <cache>/shard-00000.safetensors    pair_hash [n, 32] u8, chosen_logps / rejected_logps [n] f32,
    ...                                chosen_tokens / rejected_tokens [n] i32, source_index [n] i64

Pairs are found by the sha256 of their final token ids, so a filtered or reshuffled data set
still hits, and a pair tokenized differently misses loudly instead of using stale values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lora_dpo.errors import CacheError
from lora_dpo.fileio import atomic_write, sha256_file

FORMAT_NAME = "lora-dpo-reference-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SHARD_GLOB = "shard-*.safetensors"
METADATA_KEY = "lora_dpo"
SHARD_KEYS = (
    "pair_hash",
    "chosen_logps",
    "rejected_logps",
    "chosen_tokens",
    "rejected_tokens",
    "source_index",
)
# Said after the first bad value a reader meets; verify goes on and lists them all.
REBUILD_HINT = "rebuild the cache with precompute-ref (lora-dpo cache verify lists every problem)"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


@dataclass
class ShardRecords:
    """Reference values of a run of pairs, in one order."""

    pair_hashes: list[bytes]  # [n] 32-byte sha256 each
    chosen_logps: torch.Tensor  # [n] fp32
    rejected_logps: torch.Tensor  # [n] fp32
    chosen_tokens: torch.Tensor  # [n] int32
    rejected_tokens: torch.Tensor  # [n] int32
    source_indices: torch.Tensor  # [n] int64

    def tensors(self) -> dict[str, torch.Tensor]:
        hashes = torch.frombuffer(bytearray(b"".join(self.pair_hashes)), dtype=torch.uint8)
        return {
            "pair_hash": hashes.view(-1, 32),
            "chosen_logps": self.chosen_logps.float().contiguous(),
            "rejected_logps": self.rejected_logps.float().contiguous(),
            "chosen_tokens": self.chosen_tokens.to(torch.int32).contiguous(),
            "rejected_tokens": self.rejected_tokens.to(torch.int32).contiguous(),
            "source_index": self.source_indices.to(torch.int64).contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ShardRecords:
        hashes = tensors["pair_hash"]
        return cls(
            pair_hashes=[bytes(row.tolist()) for row in hashes],
            chosen_logps=tensors["chosen_logps"],
            rejected_logps=tensors["rejected_logps"],
            chosen_tokens=tensors["chosen_tokens"],
            rejected_tokens=tensors["rejected_tokens"],
            source_indices=tensors["source_index"],
        )


def write_shard(
    path: Path, records: ShardRecords, split: str, extra_metadata: dict[str, str] | None = None
) -> str:
    """Atomically write one shard; returns its sha256 for the manifest.

    The metadata goes in as one sorted JSON string: safetensors writes a multi-key metadata map
    in no fixed order, and the same values must give the same bytes (and checksum).
    """
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "split": split, **(extra_metadata or {})}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(records.tensors(), str(tmp), metadata=header))
    return sha256_file(path)


def shard_metadata(path: Path) -> dict[str, Any]:
    """The metadata a shard was written with (cheap: reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc})") from None


def read_shard(path: Path) -> ShardRecords:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc})") from None
    missing = [key for key in SHARD_KEYS if key not in tensors]
    if missing:
        raise CacheError(f"{path}: shard lacks {', '.join(missing)}")
    return ShardRecords.from_tensors(tensors)


def value_problems(path: Path, records: ShardRecords) -> list[str]:
    """What is wrong with a shard's values, one line each: a summed log-prob is finite and
    <= 0, a response has at least one token. Checksums cannot see a cache written wrong."""
    problems = []
    for name in ("chosen_logps", "rejected_logps"):
        values = getattr(records, name)  # [n]
        finite = torch.isfinite(values)
        non_finite = int((~finite).sum())
        if non_finite:
            problems.append(f"{path}: {name} holds {non_finite} non-finite values")
        positive = int((finite & (values > 0)).sum())  # a response's log-prob is never above 0
        if positive:
            problems.append(f"{path}: {name} holds {positive} positive log-probs")
    for name in ("chosen_tokens", "rejected_tokens"):
        empty = int((getattr(records, name) <= 0).sum())
        if empty:
            problems.append(f"{path}: {name} holds {empty} counts <= 0")
    return problems
