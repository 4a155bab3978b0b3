"""One way to write a file durably: a crash leaves either the old file or the new one.

Every file segsearch must not lose half of (the FAISS snapshot, `indexing.json`, skip reports,
shard manifests, merge records, checkpoints) goes through `atomic_write`: a temp file beside
the target, fsync, rename, fsync of the directory (the rename lives in the directory entry,
so without that fsync a crash may bring the old file back after the write was reported).

Errors say what a user can do. A full disk raises IndexFullError: the old file is intact and
retrying after freeing space is safe. A failed fsync raises StorageFailedError: the kernel may
have dropped the unwritten pages and a later fsync can succeed without them, so the caller must
not simply retry (the "fsyncgate" rule; the index store stops writing until reopened).
"""
from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from segsearch.errors import IndexFullError, StorageFailedError

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, chunks: Sequence[bytes | memoryview] | bytes) -> None:
    """Write `chunks` (bytes-like, e.g. numpy arrays) to `path` atomically and durably."""
    path = Path(path)
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    temp = temp_path(path)
    try:
        with open(temp, "wb") as handle:
            for chunk in chunks:
                handle.write(memoryview(chunk))
            handle.flush()
            _fsync(handle.fileno(), temp)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in DISK_FULL_ERRNOS:
            raise IndexFullError(f"cannot write {path}: {space_report(path.parent)}; the previous "
                                 "file is intact. Free space there and retry") from exc
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, value) -> None:
    """`value` as indented, key-sorted JSON (one trailing newline), written atomically."""
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def temp_path(path: Path) -> Path:
    """Where `atomic_write` stages `path`: hidden, beside it, unique per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temp_files(directory: str | Path, name: str) -> None:
    """Delete the temp files of interrupted writes of `directory/name` (the real file is intact)."""
    for temp in Path(directory).glob(f".{name}.tmp-*"):
        log.info("removing %s left by an interrupted write", temp)
        temp.unlink(missing_ok=True)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or create inside `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd, Path(path))
    finally:
        os.close(fd)


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StorageFailedError(
            f"fsync of {path} failed ({os.strerror(exc.errno) if exc.errno else exc}): the disk may "
            "have lost recent writes; check it (dmesg, SMART) before writing again"
        ) from exc


def space_report(path: str | Path) -> str:
    """'no space left on the filesystem mounted at M (F bytes free)': names the disk to free."""
    path = Path(os.path.abspath(path))
    mount = path
    try:
        while mount.parent != mount and os.stat(mount.parent).st_dev == os.stat(mount).st_dev:
            mount = mount.parent
        stats = os.statvfs(path)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        return f"no space left on the filesystem holding {path}"
    return f"no space left on the filesystem mounted at {mount} ({free} bytes free), which holds {path}"
