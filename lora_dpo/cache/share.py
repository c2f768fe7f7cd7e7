"""Caches leave the machine as one parquet table, and caches of one reference join.

`export_cache` writes one row per pair: pair_hash (64-char hex), chosen_logps / rejected_logps
(float32), chosen_tokens / rejected_tokens (int32), source_index (int64), shard (the shard it
came from) and any extra field; the schema metadata (key `lora_dpo`) carries the manifest,
whose identity and reference precision an import checks, and each shard's safetensors metadata,
with which an import rebuilds every shard to its recorded checksum. Any parquet reader (pandas,
`datasets`) reads the table; a tool that re-writes the file drops the metadata, so share the
file itself.

`import_cache` and `merge_caches` add shards to a cache under its writer lock: a shard whose
pairs are all new keeps its bytes (and its name where free); one that overlaps the cache
keeps only its new pairs, in a new shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lora_dpo.cache.entries import ShardEntry
from lora_dpo.cache.format import (
    REBUILD_HINT,
    SHARD_KEYS,
    ShardRecords,
    check_shapes,
    raw_shard_metadata,
    shard_header,
    shard_name,
    shard_path,
    value_problems,
    write_raw_shard,
    write_shard,
)
from lora_dpo.cache.identity import identity_stamp, reference_differences
from lora_dpo.cache.lock import writer_lock
from lora_dpo.cache.manifest import Change, Manifest
from lora_dpo.cache.reader import load_listed_shard
from lora_dpo.cache.store import commit, current_manifest, listed_pairs, next_shard_number
from lora_dpo.errors import CacheError
from lora_dpo.fileio import atomic_write, sha256_file

METADATA_KEY = b"lora_dpo"
COLUMNS = (*SHARD_KEYS, "shard")  # one per required field, and the shard a row came from


class ShardSource(Protocol):
    """Shards to add to a cache, with the manifest they came with."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def name(self) -> str: ...  # for messages

    def records(self, entry: ShardEntry) -> ShardRecords: ...  # with extras, checked

    def copy_whole(self, entry: ShardEntry, path: Path) -> None: ...  # the shard's exact bytes at `path`


@dataclass
class DirectorySource:
    directory: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return str(self.directory)

    def records(self, entry: ShardEntry) -> ShardRecords:
        return _sound(
            shard_path(self.directory, entry.file), load_listed_shard(self.directory, entry, extras=True)
        )

    def copy_whole(self, entry: ShardEntry, path: Path) -> None:
        atomic_write(path, lambda tmp: shutil.copyfile(shard_path(self.directory, entry.file), tmp))

    def metadata(self, entry: ShardEntry) -> dict[str, str] | None:
        return raw_shard_metadata(shard_path(self.directory, entry.file))


@dataclass
class TableSource:
    """An exported table, read back: rows cut into the shards the manifest lists, in order."""

    file: Path
    manifest: Manifest
    metadata: dict[str, dict[str, str] | None]  # per shard file, its safetensors metadata
    shards: dict[str, ShardRecords]

    @property
    def name(self) -> str:
        return str(self.file)

    @classmethod
    def read(cls, file: Path) -> TableSource:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise CacheError(f"{file}: not a readable parquet file ({exc})") from None
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise CacheError(
                f"{file}: no lora_dpo metadata in the parquet schema: not an exported reference cache, "
                "or a tool re-wrote the file and dropped it (share the exported file itself)"
            )
        try:
            payload = json.loads(raw)
            manifest = Manifest.from_dict(payload["manifest"], file)
            metadata = payload["shard_metadata"]
            for entry in manifest.shards:
                value = metadata[entry.file]
                if value is not None and not (
                    isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
                ):
                    raise TypeError(f"the shard metadata of {entry.file} is not an object of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{file}: the lora_dpo metadata is damaged ({exc})") from None
        missing = [column for column in COLUMNS if column not in table.column_names]
        if missing:
            raise CacheError(f"{file}: no column {missing[0]}")
        if table.num_rows != manifest.total_pairs:
            raise CacheError(
                f"{file}: {table.num_rows} rows, the manifest it carries lists {manifest.total_pairs} pairs"
            )
        shards, start = {}, 0
        for entry in manifest.shards:
            rows = table.slice(start, entry.pairs)
            start += entry.pairs
            if set(rows.column("shard").to_pylist()) != {entry.file}:
                raise CacheError(
                    f"{file}: the rows of {entry.file} are not where the manifest puts them (rows re-ordered?)"
                )
            shards[entry.file] = _rows_to_records(file, entry, rows)
        return cls(file, manifest, metadata, shards)

    def records(self, entry: ShardEntry) -> ShardRecords:
        return _sound(Path(f"{self.file}:{entry.file}"), self.shards[entry.file])

    def copy_whole(self, entry: ShardEntry, path: Path) -> None:
        write_raw_shard(path, self.shards[entry.file], self.metadata[entry.file])


def export_cache(cache_dir: str | Path, out: str | Path) -> int:
    """Write the cache as one parquet table at `out` (atomically); returns the pairs written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache_dir, out = Path(cache_dir), Path(out)
    source = DirectorySource(cache_dir, Manifest.read(cache_dir))
    tables = [_records_to_table(entry, source.records(entry)) for entry in source.manifest.shards]
    table = pa.concat_tables(tables, promote_options="default")  # a field some shards lack is null there
    payload = {
        "manifest": source.manifest.to_dict(),
        "shard_metadata": {entry.file: source.metadata(entry) for entry in source.manifest.shards},
    }
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(payload, sort_keys=True)})
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    return table.num_rows


def import_cache(file: str | Path, into: str | Path, *, wait: bool = True) -> int:
    """Add the pairs of an exported table to the cache at `into` (a new one if there is none);
    returns the pairs added."""
    return join_into(Path(into), [TableSource.read(Path(file))], f"import {Path(file).name}", wait)


def merge_caches(sources: Sequence[str | Path], into: str | Path, *, wait: bool = True) -> int:
    """Join caches of one reference into `into` (new, or one of them); returns the pairs added."""
    loaded = [DirectorySource(Path(s), Manifest.read(Path(s))) for s in sources]
    return join_into(Path(into), loaded, f"merge {', '.join(str(s) for s in sources)}", wait)


def join_into(target: Path, sources: Sequence[ShardSource], what: str, wait: bool) -> int:
    """Add every source's pairs the target lacks, as shards, and list the sources' data sets."""
    with writer_lock(target, wait=wait):
        current = current_manifest(target, "repair or remove it first")
        base = current or sources[0].manifest
        base_name = str(target) if current else sources[0].name
        for source in sources:
            differences = reference_differences(
                (base.identity, base.reference),
                (source.manifest.identity, source.manifest.reference),
                (f"{base_name} has", f"{source.name} has"),
            )
            if differences:
                raise CacheError(
                    f"{source.name} holds another reference's values than {base_name}: {'; '.join(differences)} "
                    "(a cache holds the values of one reference)"
                )
            if source.manifest.rows != base.rows:  # KTO's unpaired rows, or preference pairs
                raise CacheError(
                    f"{source.name} holds {source.manifest.rows} rows, {base_name} {base.rows} ones "
                    "(a cache holds one kind of row)"
                )
        known = listed_pairs(target, current)
        taken = {entry.file for entry in current.shards} if current else set()
        number = next_shard_number(current)
        stamp = identity_stamp(base.identity, base.reference.precision)
        added_entries: list[ShardEntry] = []
        for source in sources:
            # Against the pairs the target held before this source: an import of an export
            # rebuilds it exactly, a pair twice in one source included.
            before = set(known)
            for entry in source.manifest.shards:
                records = source.records(entry)
                new = [row for row, pair_hash in enumerate(records.pair_hashes) if pair_hash not in before]
                if not new:
                    continue
                if len(new) == len(records) and entry.file not in taken:
                    name = entry.file
                else:
                    name, number = shard_name(number), number + 1
                    while name in taken:
                        name, number = shard_name(number), number + 1
                path = shard_path(target, name)
                if len(new) == len(records):  # whole: the very bytes, checked against the checksum
                    source.copy_whole(entry, path)
                    if sha256_file(path) != entry.sha256:
                        path.unlink()
                        raise CacheError(
                            f"{source.name}: {entry.file} does not reproduce its checksum (altered after export?)"
                        )
                    added_entries.append(
                        ShardEntry(name, entry.split, entry.pairs, entry.sha256, entry.fields)
                    )
                else:
                    subset = records.select(new)
                    checksum = write_shard(path, subset, shard_header(entry.split, stamp))
                    added_entries.append(ShardEntry(name, entry.split, len(subset), checksum, subset.fields))
                taken.add(name)
                known.update(records.pair_hashes[row] for row in new)
        datasets = tuple(d for source in sources for d in source.manifest.datasets)
        history = tuple(c for source in sources for c in source.manifest.history)
        added = sum(entry.pairs for entry in added_entries)
        change = Change.of(what, added=added)
        manifest = (current or Manifest.empty(base.identity, base.reference, base.rows)).with_additions(
            tuple(added_entries), datasets, change, history
        )
        commit(target, manifest)
    return added


def _sound(where: Path, records: ShardRecords) -> ShardRecords:
    """Values checked on the way in: a cache never takes in a NaN from another."""
    problems = value_problems(where, records)
    if problems:
        raise CacheError(f"{problems[0]}; {REBUILD_HINT}")
    return records


def _records_to_table(entry: ShardEntry, records: ShardRecords) -> Any:
    import pyarrow as pa

    columns: dict[str, Any] = {
        "pair_hash": pa.array([pair_hash.hex() for pair_hash in records.pair_hashes], pa.string()),
        "chosen_logps": pa.array(records.chosen_logps.numpy()),
        "rejected_logps": pa.array(records.rejected_logps.numpy()),
        "chosen_tokens": pa.array(records.chosen_tokens.numpy()),
        "rejected_tokens": pa.array(records.rejected_tokens.numpy()),
        "source_index": pa.array(records.source_indices.numpy()),
        "shard": pa.array([entry.file] * len(records), pa.string()),
    }
    for name, tensor in sorted(records.extras.items()):
        if tensor.ndim == 1:
            columns[name] = pa.array(tensor.numpy())
        elif tensor.ndim == 2:  # [n, k]: a fixed-size list per row
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(tensor.reshape(-1).numpy()), tensor.shape[1]
            )
        else:
            raise CacheError(
                f"{entry.file}: {name} is {list(tensor.shape)}; an export holds extra fields of [n] or [n, k]"
            )
    return pa.table(columns)


def _rows_to_records(file: Path, entry: ShardEntry, rows: Any) -> ShardRecords:
    """One shard's rows back to tensors, each field with the dtype its column has."""
    import pyarrow as pa

    where = Path(f"{file}:{entry.file}")
    hexes = rows.column("pair_hash").to_pylist()
    try:
        if any(not isinstance(h, str) or len(h) != 64 for h in hexes):
            raise ValueError("not 64 characters")
        raw = bytearray(bytes.fromhex("".join(hexes)))
    except ValueError as exc:
        raise CacheError(f"{where}: a pair_hash is not 64 hex digits ({exc})") from None
    tensors = {"pair_hash": torch.frombuffer(raw, dtype=torch.uint8).view(-1, 32)}
    for name in (field for field in entry.fields if field != "pair_hash"):
        if name not in rows.column_names:
            raise CacheError(f"{where}: no column {name}")
        column = rows.column(name).combine_chunks()
        if column.null_count:
            raise CacheError(f"{where}: {name} has empty cells")
        if pa.types.is_fixed_size_list(column.type):
            values = (
                column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
            )
        else:
            values = column.to_numpy(zero_copy_only=False)
        tensors[name] = torch.from_numpy(np.array(values, copy=True))
    check_shapes(where, tensors)
    return ShardRecords.from_tensors(tensors)
