"""One writer at a time on a reference cache: the lock file `<cache>/.lock` (lora_dpo.lockfile),
held for a whole precompute, import or merge.

Readers never take it: a writer only adds new shard files and then replaces the manifest
atomically, so a reader sees the old cache or the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_dpo.cache.format import LOCK
from lora_dpo.errors import CacheError
from lora_dpo.lockfile import LockFile

log = logging.getLogger(__name__)


@contextmanager
def writer_lock(cache_dir: str | Path, *, wait: bool = True) -> Iterator[None]:
    """Hold the cache's writer lock; with `wait=False` fail at once when another process has it."""
    cache_dir = Path(cache_dir)
    lock = LockFile(cache_dir / LOCK)

    def waiting(holder: str) -> None:
        log.warning("%s: waiting for %s, which is writing this reference cache", cache_dir, holder)

    if not lock.acquire(wait=wait, on_wait=waiting):
        raise CacheError(
            f"{cache_dir}: another process ({lock.holder()}) is writing this reference cache; "
            "run again when it is done, or without --no-wait to wait for it"
        )
    try:
        yield
    finally:
        lock.release()
