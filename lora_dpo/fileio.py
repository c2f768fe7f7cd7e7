"""Atomic, durable writes with ordinary permissions: the one home for how lora-dpo writes files.

Rules every writer follows:
- a file or directory appears under its final name only when complete (temp name in the same
  directory, fsync, rename), so a reader or a resumed run sees the old state or the new one;
- the rename is made durable by an fsync of the parent directory;
- permissions are what `open()` / `mkdir()` would give under the process umask (temp files
  from `mkstemp`/`mkdtemp` start private, 0600/0700, and are widened before they appear);
- an old file or directory is replaced only once its replacement is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new directory."""
    return 0o777 & ~current_umask()


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (the new name survives a power cut)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temp file beside `path`; it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # after the write: some writers recreate the file
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_default_modes(directory: Path) -> None:
    """Give `directory` and everything under it the modes `open()`/`mkdir()` would."""
    directory.chmod(dir_mode())
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode() if path.is_dir() else file_mode())


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then every directory (deepest first)."""
    dirs = [directory]
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            dirs.append(path)
        else:
            fsync_file(path)
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(path)


@contextmanager
def staged_directory(target: Path, *, suffix: str = ".partial") -> Iterator[Path]:
    """A hidden temp directory beside `target` to fill; on a clean exit it is published as
    `target` (modes, fsync, rename; an existing `target` is replaced only then). On an error
    the temp directory is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    try:
        yield tmp
        publish_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename the complete directory `tmp` to `target`, replacing an old `target` only now."""
    apply_default_modes(tmp)
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old)


# A full disk as the OS words it; writers in Rust (safetensors) and C++ report the OS error in
# their message, not as an OSError with an errno.
FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
FULL_DISK_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}


def full_disk_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `exc` says the file system is full, else None."""
    if isinstance(exc, OSError) and exc.errno in FULL_DISK:
        return exc.errno
    text = str(exc)
    return next((code for message, code in FULL_DISK_TEXT.items() if message in text), None)


def free_mb(path: Path) -> int:
    """Free megabytes on the file system of `path` (or of its nearest existing parent)."""
    where = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    return shutil.disk_usage(where).free // 1_000_000 if where is not None else 0


def full_disk_message(exc: BaseException, writing: Path | str | None) -> str | None:
    """One line for a full disk, naming the file (the error's own, else `writing`) and the free
    space there; None when `exc` is not a full disk. Every write above is atomic, so what was
    on disk before is still there."""
    code = full_disk_errno(exc)
    if code is None:
        return None
    where = Path(getattr(exc, "filename", None) or writing or ".")
    return f"{FULL_DISK[code]} writing {where} (free there: {free_mb(where)} MB)"
