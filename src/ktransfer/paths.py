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
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
