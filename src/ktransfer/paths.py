"""Where ktransfer keeps what it computes once and reuses: trained zoo weights, predictions, downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KTRANSFER_CACHE``, else ``$XDG_CACHE_HOME/ktransfer``, else ``~/.cache/ktransfer``."""
    if env := os.environ.get("KTRANSFER_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ktransfer"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
