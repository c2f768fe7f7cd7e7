"""Test helper: a copy of a reference cache with edited shard tensors and matching checksums,
standing in for a cache whose values are wrong in ways the checksums cannot see."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_dpo.cache import Manifest
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
