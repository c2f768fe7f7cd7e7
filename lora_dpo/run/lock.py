"""One writer per run directory: the lock file RUN/.lock (lora_dpo.lockfile), taken without
waiting and held for a whole training run (under torchrun by rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_dpo.errors import ConfigError
from lora_dpo.lockfile import LockFile


class RunLock:
    def __init__(self, path: Path, run: Path):
        self.lock = LockFile(path)
        self.run = run  # the run directory named in the error

    def acquire(self) -> RunLock:
        if not self.lock.acquire(wait=False):
            raise ConfigError(
                f"train.output_dir={str(self.run)!r} is being written by another training run "
                f"({self.lock.holder()}); wait for it to end or choose another directory"
            )
        return self

    def release(self) -> None:
        self.lock.release()

    @property
    def held(self) -> bool:
        return self.lock.held

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
