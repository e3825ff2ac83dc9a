"""Checkpoints of one transfer: written atomically, checked against the run's configuration, resumed from.

A folder holds the checkpoints of the runs written into it, each file named by the run's
fingerprint and its step (``<fingerprint>-step<N>.pt``), plus ``finished.json``: the
fingerprints of the runs that completed there. A checkpoint is written to a temporary file,
flushed to disk and renamed into place, so a crash leaves either the old file or the new one,
never half of one; the previous checkpoint is removed only once a newer one is complete, and
the two newest are kept so that a damaged newest one falls back to the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import KTransferError
from .paths import atomic_path

FINISHED_FILE = "finished.json"
KEEP = 2  # the newest checkpoint and the one before it
_NAME = re.compile(r"^(?P<fingerprint>[0-9a-f]{16})-step(?P<step>\d{9})\.pt$")


class CheckpointError(KTransferError):
    """A checkpoint folder that belongs to another run's configuration."""


class RunFinishedError(KTransferError):
    """The run asked for has finished already in this checkpoint folder; nothing was changed."""


def fingerprint_of(settings: dict) -> str:
    """A short hash of a run's settings (plain JSON data)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_difference(saved: dict, current: dict) -> str:
    """``key: A there, B now`` for each setting that differs (``hparams.temperature: ...`` inside nested ones)."""
    saved, current = flatten(saved), flatten(current)
    keys = sorted(set(saved) | set(current))
    parts = [f"{key}: {_short(saved.get(key))} there, {_short(current.get(key))} now" for key in keys if saved.get(key) != current.get(key)]
    return "; ".join(parts)


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level, keyed ``a.b`` (``hparams.temperature``)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a system that cannot open folders (Windows): the rename is what it offers
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Write ``path`` through a temporary file in the same folder: fsync it, then rename it into place."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(path.parent)


class CheckpointStore:
    """The checkpoints of one run (named by ``settings``) in ``folder``.

    ``every_steps``: also write one after every that many optimiser steps; ``minutes``: also
    write one when that long has passed since the last (checked after each step). One is always
    written at the end of each epoch. ``log`` receives the lines a user should read (resuming,
    a damaged file passed over).
    """

    def __init__(self, folder: str | Path, settings: dict, every_steps: int | None = None, minutes: float | None = None, log: Callable[[str], None] | None = None, hint: str = "use another --out (checkpoint_dir from Python)"):
        if every_steps is not None and every_steps < 1:
            raise CheckpointError(f"checkpoint every {every_steps} steps: give a number of steps of at least 1")
        if minutes is not None and not minutes > 0:
            raise CheckpointError(f"checkpoint every {minutes} minutes: give a positive number of minutes")
        self.folder, self.settings = Path(folder), dict(settings)
        self.fingerprint = fingerprint_of(self.settings)
        self.every_steps, self.minutes = every_steps, minutes
        self.log = log or (lambda line: None)
        self.hint = hint
        self.last_saved = time.monotonic()

    # ------------------------------------------------------------------ reading

    def _files(self) -> list[tuple[str, int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((match["fingerprint"], int(match["step"]), path))
        return sorted(found, key=lambda item: item[1])

    def own_files(self) -> list[Path]:
        """This run's checkpoints, oldest first."""
        return [path for fingerprint, _, path in self._files() if fingerprint == self.fingerprint]

    def finished_fingerprints(self) -> list[str]:
        path = self.folder / FINISHED_FILE
        if not path.exists():
            return []
        try:
            return list(json.loads(path.read_text())["finished"])
        except (OSError, ValueError, KeyError, TypeError):
            self.log(f"Warning: {path} cannot be read; treating no run there as finished")
            return []

    def check(self) -> None:
        """Refuse a folder that holds an unfinished run of another configuration, or this run finished."""
        finished = set(self.finished_fingerprints())
        if self.fingerprint in finished:
            raise RunFinishedError(f"this run has finished already in {self.folder}; nothing was changed (to run it again, delete {self.folder} or {self.hint})")
        others = [(fingerprint, path) for fingerprint, _, path in self._files() if fingerprint != self.fingerprint and fingerprint not in finished]
        if not others:
            return
        saved = self._read_settings(others[-1][1])
        difference = describe_difference(saved, self.settings) if saved is not None else ""
        what = f" ({difference})" if difference else ""
        raise CheckpointError(
            f"{self.folder} holds checkpoints of an unfinished run with another configuration{what}; "
            f"rerun it with its own settings to resume it, {self.hint}, or delete {self.folder} to start over"
        )

    @staticmethod
    def _read_settings(path: Path) -> dict | None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["settings"]
        except Exception:  # noqa: BLE001 - a damaged file names no settings; the refusal still stands
            return None

    def load_latest(self, set_aside: bool = True) -> dict | None:
        """The newest readable checkpoint of this run, or None. A damaged one is reported and set aside as ``*.corrupt``.

        Several processes may read one folder (the ranks of a torchrun launch): only the one with
        ``set_aside`` renames a damaged file (rank 0); the others pass over it and leave it. A file
        that another process renamed meanwhile (listed, then gone) is passed over as damaged.
        """
        for path in reversed(self.own_files()):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                if checkpoint.get("fingerprint") != self.fingerprint:
                    raise ValueError("it names another configuration")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is passed over the same way
                aside = path.with_name(path.name + ".corrupt")
                if set_aside:
                    try:
                        os.replace(path, aside)
                    except FileNotFoundError:  # another process set it aside first
                        pass
                self.log(f"Warning: checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); kept as {aside.name}, using the one before")
                continue
            self.log(f"resuming from {path} ({checkpoint['where']})")
            return checkpoint
        return None

    # ------------------------------------------------------------------ writing

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimiser step ``step`` (mid-epoch)."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.minutes is not None and time.monotonic() - self.last_saved >= self.minutes * 60

    def save(self, state: dict, step: int, where: str = "") -> Path:
        """Write a checkpoint of ``state`` at ``step`` (``where``: the same for people); then drop this run's older ones beyond the newest two."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.fingerprint}-step{step:09d}.pt"
        payload = {"fingerprint": self.fingerprint, "settings": self.settings, "where": where or f"step {step}", "state": state}
        atomic_write(path, lambda handle: torch.save(payload, handle))
        for old in self.own_files()[:-KEEP]:
            old.unlink()
        self.last_saved = time.monotonic()
        return path

    def finish(self, keep: bool = False) -> None:
        """Record this run as finished; remove its checkpoints unless ``keep``."""
        finished = self.finished_fingerprints()
        if self.fingerprint not in finished:
            finished.append(self.fingerprint)
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"finished": finished}, indent=1).encode()
        atomic_write(self.folder / FINISHED_FILE, lambda handle: handle.write(text))
        if not keep:
            for path in self.own_files():
                path.unlink()
