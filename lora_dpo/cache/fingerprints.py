"""The weights fingerprint of a cache identity, with a memo so an 8B model is hashed once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from lora_dpo.adapter_start import adapter_sha256, read_start_adapter
from lora_dpo.config import ModelConfig
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import sha256_file, write_json
from lora_dpo.model import resolve_model_dir

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(cfg: ModelConfig) -> str:
    """sha256 over the model's weight files (names, sizes, contents), for the cache identity.

    Hashing 16 GB of weights takes minutes, so each file's digest is memoised by its resolved
    path, size and modification time: any rewrite of a weight file changes the fingerprint.
    """
    directory = resolve_model_dir(cfg)
    if directory is None:
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: not a local directory and not in the local hub cache"
        )
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: no weight files in {directory}")
    memo = FingerprintMemo.load()
    digest = hashlib.sha256()
    for weight_file in files:
        digest.update(f"{weight_file.name}:{memo.file_digest(weight_file)}\n".encode())
    memo.save()
    return digest.hexdigest()


def adapter_fingerprint(cfg: ModelConfig) -> str | None:
    """sha256 of the start adapter's weights (`model.adapter_path`), None without one: the
    reference is base + that adapter, so another adapter is another reference."""
    adapter = read_start_adapter(cfg)
    return None if adapter is None else adapter_sha256(adapter)


class FingerprintMemo:
    """sha256 of weight files, keyed by (resolved path, size, mtime), in the user's cache dir
    (`LORA_DPO_CACHE_HOME`, else ~/.cache/lora-dpo)."""

    def __init__(self, path: Path, entries: dict[str, str]):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> FingerprintMemo:
        home = Path(os.environ.get("LORA_DPO_CACHE_HOME", Path.home() / ".cache" / "lora-dpo"))
        path = home / "weight-fingerprints.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):  # absent or damaged: start afresh, it is only a memo
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def file_digest(self, weight_file: Path) -> str:
        real = weight_file.resolve()  # hub snapshots are symlinks into a blob store
        stat = real.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            self.entries[key] = sha256_file(real)
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_json(self.path, self.entries)
        except OSError as exc:  # a read-only home only costs re-hashing next time
            log.warning("could not save weight fingerprints to %s: %s", self.path, exc)
