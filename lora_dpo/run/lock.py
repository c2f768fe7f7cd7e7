"""One writer per run directory: an exclusive, non-blocking `flock` on RUN/.lock.

The lock is held for a whole training run (under torchrun by rank 0 only) and released by the
kernel when the process ends, however it ends: a killed run leaves no stale lock. The file
names its holder (pid, host, command, start time) for the error a second writer gets; it is
written in place, not renamed, because the lock belongs to the file's inode. Readers
(`report`, `merge`, `eval`) never take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from lora_dpo.errors import ConfigError
from lora_dpo.fileio import file_mode


class RunLock:
    def __init__(self, path: Path, run: Path):
        self.path = Path(path)
        self.run = run  # the run directory named in the error
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"train.output_dir={str(self.run)!r} is being written by another training run "
                f"({describe_holder(read_holder(self.path))}); wait for it to end or choose another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            holder = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Close the file (the kernel drops the lock); the file stays, as unlinking a lock
        file lets a third process lock a new inode while a second still holds the old one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # the holder has not written it yet
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "holder unknown: it has just started"
    text = f"pid {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", since {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text
