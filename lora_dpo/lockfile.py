"""One writer at a time: an exclusive `flock` on a lock file that names its holder.

Used for a run directory (`RUN/.lock`, held for a whole training run) and for a reference cache
(`<cache>/.lock`, held for a precompute, import or merge). The kernel releases the lock when the
process ends, however it ends, so a killed writer leaves no stale lock. The file names its
holder (pid, host, command, start time) for the message another writer gets; it is written in
place, not renamed, and never removed, because the lock belongs to the file's inode (unlinking
it would let a third process lock a new inode while a second still holds the old one).
Readers never take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_dpo.fileio import file_mode


class LockFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, *, wait: bool, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lock; False when another process holds it and `wait` is off. While waiting,
        `on_wait` gets the holder's description once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return False
                if on_wait is not None:
                    on_wait(self.holder())
                fcntl.flock(fd, fcntl.LOCK_EX)
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Close the file: the kernel drops the lock; the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, as the file says: e.g. `pid 4242 on node-3, since ...: lora-dpo train`."""
        return describe_holder(read_holder(self.path))


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
