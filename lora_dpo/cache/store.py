"""How a writer changes a cache without destroying anything valid, under the writer lock:

1. read the current manifest (the cache as it is), and check the new values are for its reference;
2. write new shards under names no manifest lists (numbers after the highest listed);
3. replace the manifest atomically, listing the old shards and the new;
4. remove the shard files it does not list (left by a killed run, or replaced by --rebuild).

A writer killed before step 3 leaves the old cache as it was, plus unlisted shards that the
next run reuses (a shard's name, pairs and identity stamp must all match) or removes.
"""

from __future__ import annotations

from pathlib import Path

from lora_dpo.cache.entries import ReferenceIdentity, ReferenceRun
from lora_dpo.cache.format import MANIFEST, SHARD_GLOB, is_shard_name, shard_number
from lora_dpo.cache.identity import reference_differences
from lora_dpo.cache.manifest import Manifest
from lora_dpo.cache.reader import load_listed_shard
from lora_dpo.errors import CacheError


def readable_manifest(cache_dir: Path) -> Manifest | None:
    """The current manifest, or None where there is none or it cannot be read."""
    try:
        return Manifest.read(cache_dir) if (cache_dir / MANIFEST).is_file() else None
    except CacheError:
        return None


def current_manifest(cache_dir: Path, hint: str) -> Manifest | None:
    """The manifest a writer extends: None for a new cache; an unreadable one is an error
    (with `hint`, what to do about it), never silently replaced."""
    if not (cache_dir / MANIFEST).is_file():
        return None
    try:
        return Manifest.read(cache_dir)
    except CacheError as exc:
        raise CacheError(f"{exc} ({hint})") from None


def check_same_reference(
    cache_dir: Path,
    manifest: Manifest,
    reference: tuple[ReferenceIdentity, ReferenceRun],
    hint: str,
    labels: tuple[str, str] = ("cache was built with", "this run uses"),
) -> None:
    """One cache holds one reference's values: another reference is refused, naming what differs."""
    differences = reference_differences((manifest.identity, manifest.reference), reference, labels)
    if differences:
        raise CacheError(
            f"{cache_dir}: the cache holds another reference's values: {'; '.join(differences)} ({hint})"
        )


def listed_pairs(cache_dir: Path, manifest: Manifest | None) -> set[bytes]:
    """The pair hashes the cache holds, every listed shard checked against its checksum."""
    if manifest is None:
        return set()
    hint = "lora-dpo cache verify lists every problem; precompute-ref --rebuild replaces the cache"
    hashes: set[bytes] = set()
    for entry in manifest.shards:
        try:
            hashes.update(load_listed_shard(cache_dir, entry).pair_hashes)
        except CacheError as exc:
            raise CacheError(f"{exc} ({hint})") from None
    return hashes


def next_shard_number(manifest: Manifest | None) -> int:
    """New shards are numbered after every listed one, so none of them is ever overwritten."""
    numbers = [shard_number(entry.file) for entry in manifest.shards] if manifest else []
    return max((n for n in numbers if n is not None), default=-1) + 1


def unlisted_shards(cache_dir: Path, manifest: Manifest) -> list[Path]:
    """Shard files the manifest does not list (plain files or links; a link itself, not its target)."""
    listed = {entry.file for entry in manifest.shards}
    return sorted(
        path
        for path in Path(cache_dir).glob(SHARD_GLOB)
        if is_shard_name(path.name) and path.name not in listed and (path.is_file() or path.is_symlink())
    )


def commit(cache_dir: Path, manifest: Manifest) -> None:
    """Steps 3 and 4: the new manifest replaces the old, then what it does not list goes."""
    manifest.write(cache_dir)
    for path in unlisted_shards(cache_dir, manifest):
        path.unlink()
    # Temp files of writes a kill interrupted (atomic_write names them .<name>.<random>.tmp).
    for pattern in (f".{SHARD_GLOB}.*.tmp", f".{MANIFEST}.*.tmp"):
        for path in Path(cache_dir).glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink()
