"""One writer at a time: `flock` on `<cache>/.lock`, held for a whole precompute, import or merge.

Readers never take it: a writer only adds new shard files and then replaces the manifest
atomically, so a reader sees the old cache or the new one. The lock file holds the pid of the
process that has it, for the message another writer gets; it is never removed (removing a
lock file lets two processes lock two different files).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_dpo.cache.format import LOCK
from lora_dpo.errors import CacheError

log = logging.getLogger(__name__)


@contextmanager
def writer_lock(cache_dir: str | Path, *, wait: bool = True) -> Iterator[None]:
    """Hold the cache's writer lock; with `wait=False` fail at once when another process has it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for open()
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise CacheError(
                    f"{cache_dir}: another process ({holder}) is writing this reference cache; "
                    "run again when it is done, or without --no-wait to wait for it"
                ) from None
            log.warning("%s: waiting for %s, which is writing this reference cache", cache_dir, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"
