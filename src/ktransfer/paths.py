"""Where ktransfer keeps what it computes once and reuses: trained zoo weights, predictions, downloads."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$KTRANSFER_CACHE``, else ``$XDG_CACHE_HOME/ktransfer``, else ``~/.cache/ktransfer``."""
    if env := os.environ.get("KTRANSFER_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ktransfer"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; renamed onto ``path`` when the block ends without error.

    Readers never see half a file, and processes writing the same file at once (a study's parallel
    workers, torchrun's ranks) each write a temporary file of their own, so the survivor is one whole file.
    The file is flushed to disk (fsync) before the rename and the folder after it, so that a power
    loss leaves the old file or the whole new one, not a renamed file with its contents missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name's first 100 characters: a long name plus the suffix would pass the file system's 255-byte limit.
    tmp = path.with_name(f".{path.name[:100]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        sync_file(tmp)
        os.replace(tmp, path)
        sync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync_file(path: Path) -> None:
    """Flush a closed file's contents to disk (fsync)."""
    descriptor = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows syncs only files open for writing
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_directory(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, new files) to disk, where the system can open folders."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder: the rename is what it offers
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse to sync a folder
        pass
    finally:
        os.close(descriptor)


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing), waiting for any other holder.

    For work several processes may start at once (parallel workers building the same cache entry):
    the second waits, then finds the work done. The OS frees the lock if its holder dies. Where there
    are no advisory locks, nothing is held and the callers' atomic renames keep the result whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` whole (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
