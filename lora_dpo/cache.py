"""The reference cache, format v1: write, read, check identity, look pairs up by content hash.

    <cache>/manifest.json              written last: its presence marks a complete cache
    <cache>/shard-00000.safetensors    pair_hash [n, 32] u8, chosen_logps / rejected_logps [n] f32,
    ...                                chosen_tokens / rejected_tokens [n] i32, source_index [n] i64

Pairs are found by the sha256 of their final token ids, so a filtered or reshuffled data set
still hits, and a pair tokenized differently misses loudly instead of using stale values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_dpo.errors import CacheError
from lora_dpo.fileio import atomic_write, sha256_file

FORMAT_NAME = "lora-dpo-reference-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = "lora_dpo"
SHARD_KEYS = (
    "pair_hash",
    "chosen_logps",
    "rejected_logps",
    "chosen_tokens",
    "rejected_tokens",
    "source_index",
)


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
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ShardRecords":
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
    from safetensors import safe_open

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


def identity_differences(cached: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts, e.g.
    `tokenization.max_length: cache was built with 1024, this run uses 2048`."""
    differences = []
    for key in sorted(set(cached) | set(current)):
        name = f"{prefix}{key}"
        old, new = cached.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += identity_differences(old, new, prefix=f"{name}.")
        elif old != new:
            differences.append(f"{name}: cache was built with {old!r}, this run uses {new!r}")
    return differences


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """The manifest of a complete cache of this format version, else a CacheError saying why."""
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(
            f"{cache_dir}: no {MANIFEST}; not a reference cache, or its precompute did "
            "not finish (run precompute-ref again: it resumes from complete shards)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"{manifest_path}: format version {manifest.get('version')}, "
            f"this lora-dpo reads version {FORMAT_VERSION}"
        )
    return manifest


def load_listed_shard(cache_dir: Path, entry: dict[str, Any], verify_checksum: bool = True) -> ShardRecords:
    """One shard of the manifest, checked against its recorded checksum and pair count."""
    path = cache_dir / entry["file"]
    if not path.is_file():
        raise CacheError(f"{path}: shard listed in the manifest is missing")
    if verify_checksum and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{path}: checksum mismatch, the shard is truncated or altered")
    records = read_shard(path)
    if len(records.pair_hashes) != entry["pairs"]:
        raise CacheError(f"{path}: holds {len(records.pair_hashes)} pairs, manifest says {entry['pairs']}")
    return records


class ReferenceCache:
    """A complete cache on disk, loaded into memory (a few bytes per pair) and indexed by hash."""

    def __init__(self, cache_dir: str | Path, *, verify_checksums: bool = True):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        parts = [
            load_listed_shard(self.cache_dir, entry, verify_checksums)
            for entry in self.manifest["shards"]
        ]
        self.pair_hashes = [h for part in parts for h in part.pair_hashes]
        self.chosen_logps = torch.cat([p.chosen_logps for p in parts])  # [N]
        self.rejected_logps = torch.cat([p.rejected_logps for p in parts])  # [N]
        self.chosen_tokens = torch.cat([p.chosen_tokens for p in parts])  # [N]
        self.rejected_tokens = torch.cat([p.rejected_tokens for p in parts])  # [N]
        self.row_of = {pair_hash: row for row, pair_hash in enumerate(self.pair_hashes)}

    def __len__(self) -> int:
        return len(self.pair_hashes)

    def check_covers(self, pairs: Sequence[Any], what: str) -> None:
        """Every pair of the run (TokenizedPair) must be in the cache, else name the first
        missing ones by their source rows."""
        missing = [p.source_index for p in pairs if p.pair_hash not in self.row_of]
        if missing:
            raise CacheError(
                f"{self.cache_dir}: {len(missing)} of {len(pairs)} {what} pairs are not in "
                f"the reference cache (source rows {missing[:5]}...); rebuild it with precompute-ref "
                "on this data"
            )

    def lookup(self, pair_hashes: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) reference log-probs for these pairs."""
        try:
            rows = torch.tensor([self.row_of[h] for h in pair_hashes], dtype=torch.long)
        except KeyError as exc:
            raise CacheError(
                f"{self.cache_dir}: pair {exc.args[0].hex()[:16]} is not in the reference cache"
            ) from None
        return self.chosen_logps[rows], self.rejected_logps[rows]
