"""Test helper: a copy of a reference cache with edited shard tensors and matching checksums,
standing in for a cache whose values are wrong in ways the checksums cannot see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lora_dpo.fileio import sha256_file, write_json


def edited_cache_copy(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = target / entry["file"]
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
        entry["sha256"] = sha256_file(path)
    write_json(target / "manifest.json", manifest)
    return target
