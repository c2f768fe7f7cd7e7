"""A full disk while writing a run is a one-line error naming the file and the free space."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_dpo.errors import LoraDpoError

FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# Writers in Rust (safetensors) and C++ report the OS error in their message, not as an OSError.
FULL_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}


class DiskFullError(LoraDpoError):
    """The file system holding the run directory is full (or over quota)."""


def full_disk_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return exc.errno
    text = str(exc)
    return next((code for message, code in FULL_MESSAGES.items() if message in text), None)


def free_mb(path: Path) -> int:
    """Free megabytes on the file system of `path` (or of its nearest existing parent)."""
    where = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    return shutil.disk_usage(where).free // 1_000_000 if where is not None else 0


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
        code = full_disk_errno(exc)
        if code is None:
            raise
        filename = getattr(exc, "filename", None)
        where = Path(filename) if filename else Path(path)
        raise DiskFullError(
            f"{FULL_ERRNOS[code]} writing {where} (free there: {free_mb(where)} MB); "
            "the files written before it are intact"
        ) from None
