"""Test helpers for the reference cache: a copy with edited shard tensors and matching checksums
(values wrong in ways the checksums cannot see), a count of the pairs the reference model runs
on, data files of chosen rows, and a format v1 cache."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import register_module_forward_hook

from lora_dpo.cache import Manifest, ManifestV1, ShardRecords, write_shard
from lora_dpo.cache.format import shard_metadata
from lora_dpo.fileio import sha256_file


def edited_cache_copy(
    source: Path,
    target: Path,
    edit: Callable[[dict[str, torch.Tensor]], None],
    only: Collection[str] | None = None,
) -> Path:
    """`edit` changes the tensors of every shard in place (of the shard files in `only`, if given)."""
    shutil.copytree(source, target)
    manifest = Manifest.read(target)
    shards = []
    for entry in manifest.shards:
        if only is None or entry.file in only:
            path = target / entry.file
            tensors = load_file(str(path))
            edit(tensors)
            save_file(tensors, str(path))
            entry = dataclasses.replace(entry, sha256=sha256_file(path))
        shards.append(entry)
    dataclasses.replace(manifest, shards=tuple(shards)).write(target)
    return target


@contextmanager
def counted_pairs() -> Iterator[list[int]]:
    """Pairs the reference model is run on, counted at the decoder: in the padded layout
    (train.layout=padded) a batch of B pairs is one forward of 2B rows, chosen then rejected.
    torch's global forward hook, no patching."""
    pairs: list[int] = []

    def count(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if type(module).__name__ == "LlamaModel":  # the demo's decoder, under its LM head
            mask = kwargs.get("attention_mask")
            assert mask is not None and mask.ndim == 2, (
                "counted_pairs counts padded batches: set train.layout=padded"
            )
            pairs.append(output.last_hidden_state.shape[0] // 2)

    handle = register_module_forward_hook(count, with_kwargs=True)
    try:
        yield pairs
    finally:
        handle.remove()


def write_rows(path: Path, rows: Sequence[str]) -> Path:
    """A JSON Lines data file of these lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row}\n" for row in rows))
    return path


def as_v1_cache(cache_dir: Path) -> Path:
    """Turn a cache of one build into the format v1 cache that build would have written: v1
    manifest, shard headers saying version 1 (their tensors unchanged)."""
    manifest = Manifest.read(cache_dir)
    assert len(manifest.history) == 1, "a v1 cache is one build"
    shards = []
    for entry in manifest.shards:
        path = cache_dir / entry.file
        header = {**shard_metadata(path), "version": 1}
        sha256 = write_shard(path, ShardRecords.from_tensors(load_file(str(path))), header)
        shards.append(dataclasses.replace(entry, sha256=sha256))
    build = manifest.history[0]
    ManifestV1(
        created=build.at,
        identity=manifest.identity,
        reference=manifest.reference,
        data={d.split: d.report for d in manifest.datasets},
        pairs={d.split: d.pairs for d in manifest.datasets},
        shards=tuple(shards),
        seconds=build.seconds,
        versions=build.versions,
    ).write(cache_dir)
    return cache_dir
