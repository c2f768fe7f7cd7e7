"""The reference cache on disk, format v2: its names, its shards, and what a sound value is.

    <cache>/manifest.json              replaced atomically, last: it alone says what the cache holds
    <cache>/config.yaml                the config of the last precompute-ref that changed the cache
    <cache>/.lock                      taken (flock) by whoever writes the cache
    <cache>/shard-00000.safetensors    pair_hash [n, 32] u8, chosen_logps / rejected_logps [n] f32,
    ...                                chosen_tokens / rejected_tokens [n] i32, source_index [n] i64,
                                       and any extra per-pair tensor [n, ...] (listed as `fields`)

Pairs are found by the sha256 of their final token ids, so a filtered or reshuffled data set
still hits, and a pair tokenized differently misses loudly instead of using stale values.
A shard holds pairs, not a slice of one data set: new pairs go into new shards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_dpo.errors import CacheError
from lora_dpo.fileio import atomic_write, sha256_file

FORMAT_NAME = "lora-dpo-reference-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
LOCK = ".lock"
SHARD_GLOB = "shard-*.safetensors"
# A manifest names its shards; a name is trusted only if it is a plain file name of this form,
# so a hostile manifest cannot make a reader open, or a writer remove, anything else.
SHARD_NAME = re.compile(r"shard-[0-9a-f-]+\.safetensors")
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
METADATA_KEY = "lora_dpo"
# Every shard holds these, with these dtypes and per-pair shapes; extra fields are allowed.
REQUIRED_FIELDS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "pair_hash": (torch.uint8, (32,)),
    "chosen_logps": (torch.float32, ()),
    "rejected_logps": (torch.float32, ()),
    "chosen_tokens": (torch.int32, ()),
    "rejected_tokens": (torch.int32, ()),
    "source_index": (torch.int64, ()),
}
SHARD_KEYS = tuple(REQUIRED_FIELDS)
# The extra fields precompute-ref writes for a config with train.ld_alpha < 1 (LD-DPO reads
# them), [n] f32 each: every response's log-prob over the first min(|yw|, |yl|) tokens of its pair.
SHARED_PREFIX_FIELDS = ("chosen_shared_logps", "rejected_shared_logps")
# Said after the first bad value a reader meets; verify goes on and lists them all.
REBUILD_HINT = "rebuild the cache with precompute-ref --rebuild (lora-dpo cache verify lists every problem)"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def shard_number(name: str) -> int | None:
    """The number of a name `shard_name` gives, else None."""
    match = re.fullmatch(r"shard-(\d+)\.safetensors", name)
    return int(match.group(1)) if match else None


def is_shard_name(name: str) -> bool:
    return SHARD_NAME.fullmatch(name) is not None


def shard_path(cache_dir: Path, name: str) -> Path:
    """`cache_dir / name`, for a plain shard name only (no separator, not absolute, no `..`)."""
    if not is_shard_name(name):
        raise CacheError(f"{cache_dir}: {name!r} is not a shard file name (shard-<hex>.safetensors)")
    return Path(cache_dir) / name


@dataclass
class ShardRecords:
    """Reference values of a run of pairs, in one order, and any extra per-pair tensors."""

    pair_hashes: list[bytes]  # [n] 32-byte sha256 each
    chosen_logps: torch.Tensor  # [n] fp32
    rejected_logps: torch.Tensor  # [n] fp32
    chosen_tokens: torch.Tensor  # [n] int32
    rejected_tokens: torch.Tensor  # [n] int32
    source_indices: torch.Tensor  # [n] int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, ...]

    def __len__(self) -> int:
        return len(self.pair_hashes)

    @property
    def fields(self) -> tuple[str, ...]:
        return (*SHARD_KEYS, *sorted(self.extras))

    def tensors(self) -> dict[str, torch.Tensor]:
        hashes = torch.frombuffer(bytearray(b"".join(self.pair_hashes)), dtype=torch.uint8)
        return {
            "pair_hash": hashes.view(-1, 32),
            "chosen_logps": self.chosen_logps.float().contiguous(),
            "rejected_logps": self.rejected_logps.float().contiguous(),
            "chosen_tokens": self.chosen_tokens.to(torch.int32).contiguous(),
            "rejected_tokens": self.rejected_tokens.to(torch.int32).contiguous(),
            "source_index": self.source_indices.to(torch.int64).contiguous(),
            **{name: tensor.contiguous() for name, tensor in self.extras.items()},
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ShardRecords:
        extras = {name: tensor for name, tensor in tensors.items() if name not in REQUIRED_FIELDS}
        return cls(
            pair_hashes=[bytes(row.tolist()) for row in tensors["pair_hash"]],
            chosen_logps=tensors["chosen_logps"],
            rejected_logps=tensors["rejected_logps"],
            chosen_tokens=tensors["chosen_tokens"],
            rejected_tokens=tensors["rejected_tokens"],
            source_indices=tensors["source_index"],
            extras=extras,
        )

    def select(self, rows: list[int]) -> ShardRecords:
        """The records at these rows, in this order (extras too)."""
        index = torch.tensor(rows, dtype=torch.long)
        return ShardRecords(
            [self.pair_hashes[row] for row in rows],
            self.chosen_logps[index],
            self.rejected_logps[index],
            self.chosen_tokens[index],
            self.rejected_tokens[index],
            self.source_indices[index],
            {name: tensor[index] for name, tensor in self.extras.items()},
        )


def shard_header(split: str, stamp: str) -> dict[str, Any]:
    """The metadata of a new shard: `stamp` ties it to one reference identity (resume checks it)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "split": split, "identity": stamp}


def write_shard(path: Path, records: ShardRecords, header: dict[str, Any]) -> str:
    """Atomically write one shard; returns its sha256 for the manifest.

    The metadata goes in as one sorted JSON string: safetensors writes a multi-key metadata map
    in no fixed order, and the same values must give the same bytes (and checksum).
    """
    return write_raw_shard(path, records, {METADATA_KEY: json.dumps(header, sort_keys=True)})


def write_raw_shard(path: Path, records: ShardRecords, metadata: dict[str, str] | None) -> str:
    """`write_shard` with the safetensors metadata given as is (to rebuild a shard exactly)."""
    atomic_write(path, lambda tmp: save_file(records.tensors(), str(tmp), metadata=metadata))
    return sha256_file(path)


def raw_shard_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata of a shard as stored (cheap: reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc})") from None


def shard_metadata(path: Path) -> dict[str, Any]:
    """The metadata a shard was written with (`shard_header`), {} for none."""
    try:
        return json.loads((raw_shard_metadata(path) or {}).get(METADATA_KEY, "{}"))
    except ValueError as exc:
        raise CacheError(f"{path}: unreadable shard metadata ({exc})") from None


def read_shard(path: Path, extras: bool = False) -> ShardRecords:
    """The required fields of a shard (and its extra ones with `extras`), shapes checked.

    Readers that do not ask for extra fields never load them.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            missing = [key for key in SHARD_KEYS if key not in names]
            if missing:
                raise CacheError(f"{path}: shard lacks {', '.join(missing)}")
            wanted = names if extras else SHARD_KEYS
            tensors = {name: handle.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc})") from None
    check_shapes(path, tensors)
    return ShardRecords.from_tensors(tensors)


def shard_fields(path: Path) -> tuple[str, ...]:
    """The names of the tensors in a shard, required ones first (the order `fields` lists)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable shard ({exc})") from None
    return (*[key for key in SHARD_KEYS if key in names], *sorted(names - set(SHARD_KEYS)))


def check_shapes(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every required field has its dtype and [n, ...] shape; every extra one starts with [n]."""
    n = len(tensors["pair_hash"])
    for name, tensor in tensors.items():
        if name in REQUIRED_FIELDS:
            dtype, per_pair = REQUIRED_FIELDS[name]
            expected = [n, *per_pair]
            if tensor.dtype != dtype or list(tensor.shape) != expected:
                raise CacheError(
                    f"{path}: {name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                    f"expected {str(dtype).removeprefix('torch.')} {expected}"
                )
        elif tensor.ndim == 0 or len(tensor) != n:
            raise CacheError(
                f"{path}: {name} has shape {list(tensor.shape)}, expected [{n}, ...] (one row per pair)"
            )


def value_problems(path: Path, records: ShardRecords) -> list[str]:
    """What is wrong with a shard's values, one line each: a summed log-prob is finite and
    <= 0, a response has at least one token. Checksums cannot see a cache written wrong."""
    problems = []
    logps = {"chosen_logps": records.chosen_logps, "rejected_logps": records.rejected_logps}
    logps.update({name: records.extras[name] for name in SHARED_PREFIX_FIELDS if name in records.extras})
    for name, values in logps.items():  # [n] each
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
