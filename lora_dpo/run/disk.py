"""A full disk while writing a run is a one-line error naming the file and the free space."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_dpo.errors import LoraDpoError
from lora_dpo.fileio import full_disk_message


class DiskFullError(LoraDpoError):
    """The file system holding the run directory is full (or over quota)."""


@contextmanager
def disk_full_is_an_error(path: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into a DiskFullError naming the file
    being written (or `path`) and the free space there, worded as the command line words one
    anywhere else; other errors pass unchanged. The writers under it are atomic, so what was on
    disk before is still there."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        message = full_disk_message(exc, path)
        if message is None:
            raise
        raise DiskFullError(f"{message}; the files written before it are intact") from None
