"""A study folder's SQLite file, one row per run, and the lock that lets one process at a time run the study.

Only the process that runs the study (the driver) writes here, whatever executor runs the transfers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import KTransferError
from ..results import _clean

if TYPE_CHECKING:
    from .plan import RunSpec

CONFIG_FILE = "study.yaml"
DB_FILE = "study.db"
PREDICTIONS_DIR = "predictions"  # each run's evaluation-set predictions, for the paired comparisons with controls
LABELS_KEY = "labels"  # the evaluation labels, beside them
LOCK_FILE = ".study.lock"
PHASES = ("search", "study")
STATUSES = ("pending", "running", "done", "failed")


class StudyError(KTransferError):
    """A study folder that cannot be used as asked (locked by another process, missing files)."""


class StudyStore:
    """The SQLite file of a study: one row per run, committed as each run starts and ends."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS runs (
        key TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        student TEXT NOT NULL,
        teacher TEXT NOT NULL,
        method TEXT NOT NULL,
        seed INTEGER NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        traceback TEXT,
        record TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        started REAL,
        finished REAL
    );
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A timeout lets `--status` read while a running study writes.
        self.connection = sqlite3.connect(self.path, timeout=30)
        self.connection.row_factory = sqlite3.Row
        with self.connection:
            self.connection.executescript(self.SCHEMA)

    def close(self) -> None:
        self.connection.close()

    def add(self, runs: list[RunSpec]) -> None:
        now = time.time()
        with self.connection:
            self.connection.executemany(
                "INSERT OR IGNORE INTO runs (key, phase, student, teacher, method, seed, config, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                [(r.key, r.phase, r.student, r.teacher, r.method, r.seed, json.dumps(r.config(), sort_keys=True), now) for r in runs],
            )

    def status(self, key: str) -> str | None:
        row = self.connection.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return row["status"] if row else None

    def mark_running(self, key: str) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, error = NULL, traceback = NULL WHERE key = ?", (time.time(), key)
            )

    def mark_done(self, key: str, record: dict) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE runs SET status = 'done', record = ?, finished = ?, error = NULL, traceback = NULL WHERE key = ?",
                (json.dumps(_clean(record)), time.time(), key),
            )

    def mark_failed(self, key: str, error: str, trace: str) -> None:
        with self.connection:
            self.connection.execute("UPDATE runs SET status = 'failed', error = ?, traceback = ?, finished = ? WHERE key = ?", (error, trace, time.time(), key))

    def rows(self, phase: str | None = None, keys: list[str] | None = None) -> list[sqlite3.Row]:
        query, args = "SELECT * FROM runs", []
        if phase is not None:
            query += " WHERE phase = ?"
            args.append(phase)
        rows = self.connection.execute(query + " ORDER BY created, rowid", args).fetchall()
        if keys is not None:
            by_key = {row["key"]: row for row in rows}
            return [by_key[k] for k in keys if k in by_key]
        return rows

    def set_meta(self, key: str, value) -> None:
        with self.connection:
            self.connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default=None):
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default


def _record_of(row: sqlite3.Row) -> dict:
    record = json.loads(row["record"])
    record.setdefault("run_key", row["key"])
    return record


def study_records(store: StudyStore) -> list[dict]:
    plan = store.get_meta("plan")
    rows = store.rows("study", keys=plan) if plan is not None else store.rows("study")
    return [_record_of(row) for row in rows if row["status"] == "done"]




@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Only one process may run a study folder; the OS frees the lock if that process dies."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: trust the user to run one process
        yield
        return
    handle = open(folder / LOCK_FILE, "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyError(f"another process is running the study in {folder}; wait for it, or see its progress with --status") from None
        yield
    finally:
        handle.close()


def _is_locked(folder: Path) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    path = folder / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
