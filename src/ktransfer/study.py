"""Studies: every combination of students, teachers, methods and seeds, stored run by run and resumable.

A study is a plain config (YAML or JSON) checked against the dataclasses below. Each run is one
call of :func:`ktransfer.transfer`; its record (the ``results.jsonl`` schema, history included),
its full config, its status (pending, running, done, failed) and its error live in an SQLite file
in the study folder, written as soon as the run ends. Running the study again skips what is done
and redoes what was interrupted (``running`` when no process holds the study). Methods given as a
grid are first searched on a few pairs, scored on a held-out part of the transfer data (never the
evaluation set); the setting with the best mean Δ then serves every pair (paper, appendix A).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import sqlite3
import statistics
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .api import transfer
from .augment import AUGMENTS
from .analysis import analyze
from .controls import CONTROLS, attach_controls, check_controls, is_control, load_predictions, run_control, save_predictions
from .data.base import ImageData, stratified_split
from .errors import ConfigError, DataError, KTransferError
from .extras import require
from .methods import create_method
from .models import load_model
from .models.base import Model
from .predictions import PredictionCache
from .paths import atomic_write_bytes
from .results import _clean, write_records
from .targets import resolve_targets

CONFIG_FILE = "study.yaml"
DB_FILE = "study.db"
PREDICTIONS_DIR = "predictions"  # each run's evaluation-set predictions, for the paired comparisons with controls
LABELS_KEY = "labels"  # the evaluation labels, beside them
LOCK_FILE = ".study.lock"
PHASES = ("search", "study")
STATUSES = ("pending", "running", "done", "failed")


class StudyError(KTransferError):
    """A study folder that cannot be used as asked (locked by another process, missing files)."""


# --------------------------------------------------------------------------- data

DATA_SOURCES: dict[str, Callable[["DataConfig"], tuple[ImageData, ImageData]]] = {}


def register_data_source(name: str):
    """Register a loader ``fn(data_config) -> (transfer_set, eval_set)`` under a name a config can use."""

    def wrap(fn):
        DATA_SOURCES[name] = fn
        return fn

    return wrap


@register_data_source("fashion-mnist")
def _fashion_mnist(config: "DataConfig") -> tuple[ImageData, ImageData]:
    from .data import fashion_mnist

    splits = fashion_mnist.load(config.dir)
    # fashion-mnist:validation evaluates on the validation split, where settings and predictors are fitted.
    evaluation = {"": splits.eval, "test": splits.eval, "validation": splits.validation}.get(config.source.partition(":")[2])
    if evaluation is None:
        raise ConfigError(f"data.source: {config.source!r} names no evaluation split; write fashion-mnist (the test set) or fashion-mnist:validation")
    return splits.transfer, evaluation


@register_data_source("folder")
def _folder(config: "DataConfig") -> tuple[ImageData, ImageData]:
    # folder:PATH with train/ and val/ class subfolders, through the data package's own loader.
    from .data.sources import load_data

    splits = load_data(config.source, data_dir=config.dir)
    return splits.transfer, splits.eval


@dataclass
class StudyData:
    transfer: ImageData
    eval: ImageData


@dataclass
class DataConfig:
    """Where the data comes from. ``transfer_size``/``eval_size`` take a seeded stratified subset (for quick studies)."""

    source: str = "fashion-mnist"
    dir: str | None = None
    transfer_size: int | None = None
    eval_size: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, value, data_dir: str | None = None, where: str = "data") -> "DataConfig":
        if value is None:
            value = {}
        if isinstance(value, str):
            value = {"source": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: give a source name such as 'fashion-mnist' or a mapping with keys source, dir, transfer_size, eval_size, seed")
        _check_keys(value, {"source", "dir", "transfer_size", "eval_size", "seed"}, where)
        config = cls(
            source=_as_str(value.get("source", "fashion-mnist"), f"{where}.source"),
            dir=_as_optional_str(value.get("dir"), f"{where}.dir"),
            transfer_size=_as_optional_int(value.get("transfer_size"), f"{where}.transfer_size", low=1),
            eval_size=_as_optional_int(value.get("eval_size"), f"{where}.eval_size", low=1),
            seed=_as_int(value.get("seed", 0), f"{where}.seed"),
        )
        if data_dir is not None:
            config.dir = str(data_dir)
        if config.scheme not in DATA_SOURCES:
            raise ConfigError(f"{where}.source: unknown data source {config.source!r}; known: {', '.join(sorted(DATA_SOURCES))} (folder as folder:PATH)")
        return config

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]

    def load(self) -> StudyData:
        transfer_set, eval_set = DATA_SOURCES[self.scheme](self)
        transfer_set = self._shrink(transfer_set, self.transfer_size, "transfer_size")
        eval_set = self._shrink(eval_set, self.eval_size, "eval_size")
        return StudyData(transfer_set, eval_set)

    def _shrink(self, data: ImageData, size: int | None, key: str) -> ImageData:
        if size is None or size >= len(data):
            return data
        chosen, _ = stratified_split(data.labels, size, self.seed)
        return data.subset(chosen, f"{data.name}[{size},seed={self.seed}]")

    def describe(self) -> dict:
        """What determines the data of a run (the folder is left out: the same files elsewhere are the same data)."""
        return {"source": self.source, "transfer_size": self.transfer_size, "eval_size": self.eval_size, "seed": self.seed}


# --------------------------------------------------------------------------- config


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}")


def _as_str(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string; got {value!r}")
    return value.strip()


def _as_optional_str(value, where: str) -> str | None:
    return None if value is None else _as_str(str(value) if isinstance(value, os.PathLike) else value, where)


def _as_int(value, where: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number; got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: must be at least {low}; got {value}")
    return value


def _as_optional_int(value, where: str, low: int | None = None) -> int | None:
    return None if value is None else _as_int(value, where, low)


def _as_float(value, where: str) -> float:
    # YAML reads 1e-3 (no dot) as a string; accept numeric strings rather than surprise users.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number; got {value!r}")
    return float(value)


def _as_list(value, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [item.strip() for item in value.split(",") if item.strip()]
    return [value]


def _expand_models(values: list, where: str) -> list[str]:
    from .models.store import zoo_names

    specs: list[str] = []
    for i, value in enumerate(values):
        spec = _as_str(value, f"{where}[{i}]")
        if spec == "zoo:*":
            specs.extend(f"zoo:{name}" for name in zoo_names())
        elif ":" not in spec:
            raise ConfigError(f"{where}[{i}]: model spec {spec!r} has no source; write it as SOURCE:NAME, e.g. zoo:cnn (or zoo:* for the whole zoo)")
        else:
            specs.append(spec)
    return list(dict.fromkeys(specs))


@dataclass
class MethodConfig:
    """One method; ``lr`` and each hyperparameter hold one value or several (a grid to search)."""

    name: str
    lr: list[float] = field(default_factory=list)  # empty: the top-level lr, else the method's paper default
    params: dict[str, list] = field(default_factory=dict)

    @classmethod
    def parse(cls, value, where: str) -> "MethodConfig":
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: give a method name or a mapping with keys name, lr, params")
        _check_keys(value, {"name", "lr", "params"}, where)
        name = _as_str(value.get("name"), f"{where}.name")
        lrs = [_as_float(v, f"{where}.lr") for v in _as_list(value.get("lr"), f"{where}.lr")]
        for lr in lrs:
            if lr <= 0:
                raise ConfigError(f"{where}.lr: learning rates must be positive; got {lr}")
        raw_params = value.get("params") or {}
        if not isinstance(raw_params, dict):
            raise ConfigError(f"{where}.params: expected a mapping of hyperparameter names to a value or a list of values")
        params = {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in raw_params.items()}
        for key, values in params.items():
            if not values:
                raise ConfigError(f"{where}.params.{key}: the list of values is empty")
        config = cls(name, lrs, params)
        for setting in config.settings(default_lr=1.0):
            try:
                create_method(name, **setting["params"])  # unknown names and bad values fail now, not mid-study
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return config

    def settings(self, default_lr: float | None) -> list[dict]:
        """Every combination: ``{"lr": ..., "params": {...}}`` in grid order."""
        lrs = self.lr or [default_lr if default_lr is not None else create_method(self.name).default_lr]
        keys = sorted(self.params)
        combos = itertools.product(*(self.params[k] for k in keys)) if keys else [()]
        out = []
        for combo in combos:
            params = dict(zip(keys, combo))
            for lr in lrs:
                out.append({"lr": lr, "params": params})
        return out

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.lr:
            out["lr"] = self.lr[0] if len(self.lr) == 1 else list(self.lr)
        if self.params:
            out["params"] = {k: v[0] if len(v) == 1 else list(v) for k, v in self.params.items()}
        return out


@dataclass
class SearchConfig:
    """The hyperparameter search: ``pairs`` is a count (drawn with ``seed`` from the study's pairs) or a list of [student, teacher]."""

    pairs: int | list[tuple[str, str]] = 3
    holdout: float = 0.2
    seed: int = 0
    epochs: int | None = None

    @classmethod
    def parse(cls, value, where: str = "search") -> "SearchConfig":
        value = value or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with keys pairs, holdout, seed, epochs")
        _check_keys(value, {"pairs", "holdout", "seed", "epochs"}, where)
        raw_pairs = value.get("pairs", 3)
        if isinstance(raw_pairs, int) and not isinstance(raw_pairs, bool):
            pairs: int | list[tuple[str, str]] = _as_int(raw_pairs, f"{where}.pairs", low=1)
        elif isinstance(raw_pairs, list):
            pairs = []
            for i, pair in enumerate(raw_pairs):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ConfigError(f"{where}.pairs[{i}]: expected [student, teacher]; got {pair!r}")
                pairs.append((_as_str(pair[0], f"{where}.pairs[{i}][0]"), _as_str(pair[1], f"{where}.pairs[{i}][1]")))
        else:
            raise ConfigError(f"{where}.pairs: expected a count or a list of [student, teacher]; got {raw_pairs!r}")
        holdout = _as_float(value.get("holdout", 0.2), f"{where}.holdout")
        if not 0 < holdout < 1:
            raise ConfigError(f"{where}.holdout: the held-out share of the transfer data must lie strictly between 0 and 1; got {holdout}")
        return cls(pairs, holdout, _as_int(value.get("seed", 0), f"{where}.seed"), _as_optional_int(value.get("epochs"), f"{where}.epochs", low=1))

    def to_dict(self) -> dict:
        return {"pairs": self.pairs if isinstance(self.pairs, int) else [list(p) for p in self.pairs], "holdout": self.holdout, "seed": self.seed, "epochs": self.epochs}


TOP_LEVEL_KEYS = {"name", "students", "teachers", "methods", "seeds", "epochs", "lr", "batch_size", "data", "search", "targets", "augment", "device", "controls"}
CONTROL_PREFIX = "control:"  # a control's method in the store, apart from a method a study may list (ce is one)


@dataclass
class StudyConfig:
    name: str
    students: list[str]
    teachers: list[str]
    methods: list[MethodConfig]
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 128
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    targets: str = "cached"
    augment: str = "none"
    device: str = "cpu"
    # Run once per student, learning rate and seed, beside the transfers: see ktransfer.controls.
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))

    @classmethod
    def from_dict(cls, raw: dict, default_name: str = "study", data_dir: str | None = None, source: str = "config") -> "StudyConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a study config is a mapping of keys ({', '.join(sorted(TOP_LEVEL_KEYS))}); got {type(raw).__name__}")
        _check_keys(raw, TOP_LEVEL_KEYS, source)
        students = _expand_models(_as_list(raw.get("students"), "students"), "students")
        if not students:
            raise ConfigError(f"{source}: 'students' is missing or empty; list model specs such as [zoo:cnn, zoo:vit] or zoo:*")
        teachers = _expand_models(_as_list(raw.get("teachers"), "teachers"), "teachers") if raw.get("teachers") is not None else list(students)
        raw_methods = _as_list(raw.get("methods"), "methods")
        if not raw_methods:
            raise ConfigError(f"{source}: 'methods' is missing or empty; list methods such as [kl, kl_dp] (see 'ktransfer methods')")
        methods = [MethodConfig.parse(m, f"methods[{i}]") for i, m in enumerate(raw_methods)]
        names = [m.name for m in methods]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{source}: method {name} is listed twice; a study uses one setting per method, so give one entry with lists of values to search over")
        seeds = [_as_int(s, "seeds") for s in _as_list(raw.get("seeds", [0]), "seeds")]
        if not seeds:
            raise ConfigError(f"{source}: 'seeds' is empty; give at least one, e.g. [0]")
        augment = _as_str(raw.get("augment", "none"), "augment")
        if augment not in AUGMENTS:
            raise ConfigError(f"augment: must be {' or '.join(AUGMENTS)}; got {augment!r}")
        targets = _as_str(raw["targets"], "targets") if raw.get("targets") is not None else None
        if targets is not None and targets not in ("cached", "online"):
            raise ConfigError(f"targets: must be cached or online; got {targets!r}")
        targets = resolve_targets(targets, augment)  # left out: cached, or online with augmentation
        lr = raw.get("lr")
        try:
            controls = check_controls(_as_str(c, "controls") for c in _as_list(raw.get("controls", list(CONTROLS)), "controls"))
        except ConfigError as exc:
            raise ConfigError(f"controls: {exc}") from None
        config = cls(
            name=_as_str(raw.get("name", default_name), "name"),
            students=students,
            teachers=teachers,
            methods=methods,
            seeds=list(dict.fromkeys(seeds)),
            epochs=_as_int(raw.get("epochs", 3), "epochs", low=1),
            lr=None if lr is None else _as_float(lr, "lr"),
            batch_size=_as_int(raw.get("batch_size", 128), "batch_size", low=1),
            data=DataConfig.parse(raw.get("data"), data_dir=data_dir),
            search=SearchConfig.parse(raw.get("search")),
            targets=targets,
            augment=augment,
            device=_as_str(raw.get("device", "cpu"), "device"),
            controls=controls,
        )
        if config.lr is not None and config.lr <= 0:
            raise ConfigError(f"lr: must be positive; got {config.lr}")
        if not config.pairs():
            raise ConfigError(f"{source}: no pair has a student different from its teacher; add more models")
        return config

    @classmethod
    def load(cls, path: str | Path, data_dir: str | None = None) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no study config at {path}; write one (see examples/zoo-study.yaml) or give a study folder that holds {CONFIG_FILE}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        else:
            yaml = require("yaml", "study", "reading a YAML study config")
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        default_name = path.parent.name if path.name == CONFIG_FILE else path.stem
        return cls.from_dict(raw or {}, default_name=default_name, data_dir=data_dir, source=str(path.name))

    def to_dict(self) -> dict:
        data = {"source": self.data.source, **({"dir": self.data.dir} if self.data.dir else {}), **{k: v for k, v in self.data.describe().items() if k != "source" and v is not None}}
        out = {
            "name": self.name, "students": list(self.students), "teachers": list(self.teachers),
            "methods": [m.to_dict() for m in self.methods], "seeds": list(self.seeds), "epochs": self.epochs,
            "batch_size": self.batch_size, "data": data, "targets": self.targets, "device": self.device, "controls": list(self.controls),
        }
        if self.augment != "none":
            out["augment"] = self.augment
        if self.lr is not None:
            out["lr"] = self.lr
        if self.searched_methods():
            out["search"] = self.search.to_dict()
        return out

    def pairs(self) -> list[tuple[str, str]]:
        return [(s, t) for s in self.students for t in self.teachers if s != t]

    def method(self, name: str) -> MethodConfig:
        return next(m for m in self.methods if m.name == name)

    def settings(self, method: MethodConfig) -> list[dict]:
        return method.settings(self.lr)

    def searched_methods(self) -> list[MethodConfig]:
        return [m for m in self.methods if len(self.settings(m)) > 1]

    def search_pairs(self) -> list[tuple[str, str]]:
        if not isinstance(self.search.pairs, int):
            return list(self.search.pairs)
        pairs = self.pairs()
        if self.search.pairs >= len(pairs):
            return pairs
        return sorted(random.Random(self.search.seed).sample(pairs, self.search.pairs), key=pairs.index)

    def models(self) -> list[str]:
        extra = [m for pair in (self.search_pairs() if self.searched_methods() else []) for m in pair]
        return list(dict.fromkeys([*self.students, *self.teachers, *extra]))


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One transfer of a study, with everything that determines its result."""

    phase: str
    student: str
    teacher: str
    method: str
    lr: float
    params_json: str
    seed: int
    epochs: int
    batch_size: int
    targets: str
    data_json: str
    augment: str = "none"

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def config(self) -> dict:
        config = {
            "phase": self.phase, "student": self.student, "teacher": self.teacher, "method": self.method, "lr": self.lr,
            "params": self.params, "seed": self.seed, "epochs": self.epochs, "batch_size": self.batch_size,
            "targets": self.targets, "data": json.loads(self.data_json),
        }
        if self.augment != "none":  # absent otherwise, so runs stored before augmentation existed keep their keys
            config["augment"] = self.augment
        return config

    @property
    def key(self) -> str:
        return hashlib.blake2b(json.dumps(self.config(), sort_keys=True).encode(), digest_size=8).hexdigest()

    @property
    def control(self) -> str | None:
        """``ce`` or ``self`` for a control run, else None."""
        return self.method.removeprefix(CONTROL_PREFIX) if self.method.startswith(CONTROL_PREFIX) else None

    def describe(self) -> str:
        if self.control:
            return f"{self.control} control (lr {self.lr:g}, no teacher): {self.student}, seed {self.seed}"
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        augmented = f", augment {self.augment}" if self.augment != "none" else ""
        return f"{self.method} (lr {self.lr:g}{' ' + params if params else ''}): {self.teacher} → {self.student}, seed {self.seed}{augmented}"


def setting_label(setting: dict) -> str:
    params = " ".join(f"{k}={v}" for k, v in sorted(setting["params"].items()))
    return f"lr={setting['lr']:g}" + (f" {params}" if params else "")


# --------------------------------------------------------------------------- store


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


# --------------------------------------------------------------------------- the study


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


Logger = Callable[[str], None]


class Study:
    """A study config bound to its folder. ``run()`` does what is left; ``status()`` counts."""

    def __init__(self, config: StudyConfig, folder: str | Path):
        self.config = config
        self.folder = Path(folder)

    @classmethod
    def open(cls, config_or_folder: str | Path, folder: str | Path | None = None, data_dir: str | None = None) -> "Study":
        """From a config file (the folder defaults to ./NAME) or from a study folder holding its config."""
        path = Path(config_or_folder)
        if path.is_dir():
            config = StudyConfig.load(path / CONFIG_FILE, data_dir)
            return cls(config, folder or path)
        config = StudyConfig.load(path, data_dir)
        return cls(config, folder or Path(config.name))

    # ---- planning

    def _spec(self, phase: str, student: str, teacher: str, method: str, setting: dict, seed: int) -> RunSpec:
        data = self.config.data.describe()
        epochs = self.config.epochs
        if phase == "search":
            data = {**data, "search_holdout": self.config.search.holdout, "search_seed": self.config.search.seed}
            epochs = self.config.search.epochs or epochs
        return RunSpec(
            phase, student, teacher, method, float(setting["lr"]), json.dumps(setting["params"], sort_keys=True), seed, epochs,
            self.config.batch_size, self.config.targets, json.dumps(data, sort_keys=True), self.config.augment,
        )

    def search_plan(self) -> dict[str, list[tuple[dict, list[RunSpec]]]]:
        """Per searched method: each setting with its runs on the search pairs (first seed)."""
        seed = self.config.seeds[0]
        plan = {}
        for method in self.config.searched_methods():
            plan[method.name] = [
                (setting, [self._spec("search", s, t, method.name, setting, seed) for s, t in self.config.search_pairs()])
                for setting in self.config.settings(method)
            ]
        return plan

    def study_plan(self, chosen: dict[str, dict | None]) -> list[RunSpec]:
        """The runs of every pair; a searched method appears only once its setting is chosen."""
        runs = []
        for student, teacher in self.config.pairs():
            for method in self.config.methods:
                settings = self.config.settings(method)
                setting = settings[0] if len(settings) == 1 else chosen.get(method.name)
                if setting is None:
                    continue
                for seed in self.config.seeds:
                    runs.append(self._spec("study", student, teacher, method.name, setting, seed))
        # Each control once per student, learning rate and seed of the planned transfers: same data, budget and seed.
        settings = sorted({(run.student, run.lr, run.seed) for run in runs}, key=lambda item: (self.config.students.index(item[0]), item[1], item[2]))
        controls = [
            self._spec("study", student, "", CONTROL_PREFIX + kind, {"lr": lr, "params": {}}, seed)
            for student, lr, seed in settings for kind in self.config.controls
        ]
        return controls + runs

    def choose(self, store: StudyStore) -> tuple[dict[str, dict | None], dict[str, list[dict]]]:
        """Per searched method, the setting with the best mean held-out Δ among those whose runs all finished.

        A setting with a failed run is never chosen (it diverged on some pair); one with runs
        still to do is not scored yet.
        """
        chosen: dict[str, dict | None] = {}
        tables: dict[str, list[dict]] = {}
        for method, settings in self.search_plan().items():
            rows = []
            for setting, runs in settings:
                stored = store.rows(keys=[r.key for r in runs])
                statuses = [row["status"] for row in stored] + ["pending"] * (len(runs) - len(stored))
                deltas = [_record_of(row)["delta"] for row in stored if row["status"] == "done"]
                complete = all(s == "done" for s in statuses)
                rows.append({
                    "setting": setting, "label": setting_label(setting), "runs": len(runs), "done": statuses.count("done"),
                    "failed": statuses.count("failed"), "mean_delta": statistics.fmean(deltas) if complete and deltas else None,
                    "deltas": deltas,
                })
            scored = [row for row in rows if row["mean_delta"] is not None]
            best = max(scored, key=lambda row: row["mean_delta"], default=None)  # max keeps the first of equals: grid order breaks ties
            for row in rows:
                row["chosen"] = row is best
            chosen[method] = best["setting"] if best and all(r["failed"] or r["mean_delta"] is not None for r in rows) else None
            tables[method] = rows
        return chosen, tables

    # ---- running

    def run(self, retry_failed: bool = False, log: Logger | None = None, device: str | None = None) -> dict:
        """Run every run that is not done yet; returns :meth:`status` at the end."""
        log = log or print
        self.folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.folder):
            self._write_config()
            store = StudyStore(self.folder / DB_FILE)
            try:
                self._run(store, retry_failed, log, device or self.config.device)
            finally:
                store.close()
        return self.status()

    def _write_config(self) -> None:
        yaml = require("yaml", "study", "writing the study's config")
        (self.folder / CONFIG_FILE).write_text(
            "# The config this study last ran with; `ktransfer study FOLDER` reruns it.\n" + yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        )

    def _run(self, store: StudyStore, retry_failed: bool, log: Logger, device: str) -> None:
        started = time.perf_counter()
        data = self.config.data.load()
        log(f"data: transfer set {len(data.transfer):,} images, evaluation set {len(data.eval):,} images ({self.config.data.source})")
        cache = PredictionCache()
        models = {spec: load_model(spec, data_dir=self.config.data.dir) for spec in self.config.models()}  # bad specs fail before any run
        for model in models.values():
            model.module.to(device)  # the analysis and the frozen teachers run where the students train
        self._write_analysis(models, data, cache, device)
        save_predictions(self.folder / PREDICTIONS_DIR, LABELS_KEY, data.eval.labels)

        search_plan = self.search_plan()
        if search_plan:
            holdout_size = max(1, round(self.config.search.holdout * len(data.transfer)))
            held_out, rest = stratified_split(data.transfer.labels, holdout_size, self.config.search.seed)
            search_data = StudyData(
                data.transfer.subset(rest, f"{data.transfer.name}[search-train]"),
                data.transfer.subset(held_out, f"{data.transfer.name}[held-out]"),
            )
            runs = [run for settings in search_plan.values() for _, method_runs in settings for run in method_runs]
            store.add(runs)
            log(f"hyperparameter search: {len(runs)} runs on {len(self.config.search_pairs())} pairs, scored on {len(held_out):,} held-out transfer images")
            self._execute(store, runs, models, search_data, cache, retry_failed, log, device)
        chosen, tables = self.choose(store)
        store.set_meta("search", {m: [{k: v for k, v in row.items() if k != "deltas"} for row in rows] for m, rows in tables.items()})
        if tables:
            (self.folder / "search.json").write_text(json.dumps({"holdout": self.config.search.holdout, "pairs": [list(p) for p in self.config.search_pairs()], "methods": tables}, indent=2))
        for method, setting in chosen.items():
            if setting is None:
                log(f"{method}: every setting failed on some search pair, so {method} is left out of the study; see --status")
            else:
                log(f"{method}: chosen {setting_label(setting)} (best mean Δ on held-out data)")

        runs = self.study_plan(chosen)
        store.add(runs)
        store.set_meta("plan", [r.key for r in runs])
        log(f"study: {len(runs)} runs ({len(self.config.pairs())} pairs × {len(self.config.seeds)} seed(s) × methods)")
        self._execute(store, runs, models, data, cache, retry_failed, log, device, export=True)
        self.export(store)
        log(f"finished in {time.perf_counter() - started:.0f}s; results in {self.folder / 'results.csv'}")

    def _execute(self, store, runs, models, data, cache, retry_failed, log, device, export=False) -> None:
        todo = []
        for run in runs:
            status = store.status(run.key)
            if status == "done" or (status == "failed" and not retry_failed):
                continue
            if status == "running":
                log(f"redoing interrupted run: {run.describe()}")
            todo.append(run)
        for number, run in enumerate(todo, 1):
            store.mark_running(run.key)
            settings = dict(epochs=run.epochs, lr=run.lr, batch_size=run.batch_size, seed=run.seed, targets=run.targets, augment=run.augment, device=device, cache=cache)
            try:
                if run.control:
                    result = run_control(run.control, models[run.student], data.transfer, data.eval, **settings)
                else:
                    result = transfer(models[run.student], models[run.teacher], data.transfer, data.eval, method=create_method(run.method, **run.params), **settings)
            except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the study goes on
                store.mark_failed(run.key, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                log(f"[{number}/{len(todo)}] FAILED {run.describe()}: {type(exc).__name__}: {exc}")
                continue
            record = {**result.metrics, "study": self.config.name, "phase": run.phase, "run_key": run.key, "control": bool(run.control)}
            if result.predictions is not None:  # for the paired comparisons with the controls
                save_predictions(self.folder / PREDICTIONS_DIR, run.key, result.predictions)
            store.mark_done(run.key, record)
            log(
                f"[{number}/{len(todo)}] {run.describe()}: Δ {record['delta']:+.2f}  gain {record['knowledge_gain']:.2f}  "
                f"loss {record['knowledge_loss']:.2f}  ({record['seconds']:.1f}s)"
            )
            if export:
                self.export(store)

    def _write_analysis(self, models: dict[str, Model], data: StudyData, cache: PredictionCache, device: str) -> None:
        analysis = analyze(models, data.eval, cache, device=device)
        analysis.save(self.folder / "complementarity.json")
        zoo_rows = [
            {"name": spec, "family": model.family, "parameters": model.num_parameters, "accuracy": analysis.accuracy[spec]}
            for spec, model in models.items()
        ]
        (self.folder / "zoo.json").write_text(json.dumps(zoo_rows, indent=2))

    # ---- results

    def export(self, store: StudyStore | None = None) -> list[dict]:
        """Write ``results.jsonl`` and ``results.csv`` (finished runs of the current plan), each replaced whole."""
        own = store is None
        store = store or StudyStore(self.folder / DB_FILE)
        try:
            records = study_records(store)
        finally:
            if own:
                store.close()
        compare_with_controls(self.folder, records)
        write_records(self.folder / "results.jsonl", records)
        atomic_write_bytes(self.folder / "results.csv", records_to_csv(records).encode("utf-8"))
        return records

    def status(self) -> dict:
        """Counts per phase (done, failed, interrupted, pending), the failed runs with their errors, and whether a process runs the study."""
        store = StudyStore(self.folder / DB_FILE) if (self.folder / DB_FILE).exists() else None
        try:
            chosen, _ = self.choose(store) if store else ({m.name: None for m in self.config.searched_methods()}, {})
            phases = {}
            search_runs = [r for settings in self.search_plan().values() for _, runs in settings for r in runs]
            study_runs = self.study_plan(chosen)
            waiting = len(self.config.pairs()) * len(self.config.seeds) * sum(1 for m in chosen.values() if m is None)
            failed_runs = []
            for phase, runs, unplanned in (("search", search_runs, 0), ("study", study_runs, waiting)):
                rows = store.rows(keys=[r.key for r in runs]) if store else []
                counts = {status: sum(1 for row in rows if row["status"] == status) for status in STATUSES}
                counts["pending"] += len(runs) - len(rows) + unplanned
                counts["planned"] = len(runs) + unplanned
                phases[phase] = counts
                failed_runs += [
                    {"phase": phase, "student": row["student"], "teacher": row["teacher"], "method": row["method"], "seed": row["seed"], "error": row["error"], "attempts": row["attempts"]}
                    for row in rows if row["status"] == "failed"
                ]
            return {"folder": str(self.folder), "phases": phases, "failed_runs": failed_runs, "active": _is_locked(self.folder), "waiting_for_search": waiting}
        finally:
            if store:
                store.close()


def compare_with_controls(folder: Path, records: list[dict]) -> None:
    """Add each transfer's comparison with the controls of its setting (ktransfer.controls), from the predictions the study saved."""
    if not any(is_control(r) for r in records):
        return
    labels = load_predictions(folder / PREDICTIONS_DIR, LABELS_KEY)
    if labels is None:
        return
    predictions = {id(r): p for r in records if (p := load_predictions(folder / PREDICTIONS_DIR, r.get("run_key", ""))) is not None}
    attach_controls(records, predictions, labels)


def study_records(store: StudyStore) -> list[dict]:
    plan = store.get_meta("plan")
    rows = store.rows("study", keys=plan) if plan is not None else store.rows("study")
    return [_record_of(row) for row in rows if row["status"] == "done"]


# Columns first in the CSV and the DataFrame, in this order; the rest follow alphabetically.
LEADING_COLUMNS = (
    "student", "teacher", "method", "seed", "epochs", "lr", "acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain",
    "knowledge_loss", "p_value", "pos_flips_before", "pos_flips_after", "neg_flips_before", "neg_flips_after", "delta_pos_flips",
    "delta_neg_flips", "teacher_share", "n_eval", "n_transfer",
)


def flat_row(record: dict) -> dict:
    """One table row: scalars as they are, hyperparameters as ``hparam_NAME``, lists joined; the per-epoch history left out."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("history", "stages"):
            continue
        if key == "hparams" and isinstance(value, dict):
            row.update({f"hparam_{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            row[key] = ",".join(map(str, value))
        elif isinstance(value, dict):
            row[key] = json.dumps(value, sort_keys=True)
        else:
            row[key] = value
    return row


def _columns(rows: list[dict]) -> list[str]:
    present = dict.fromkeys(k for row in rows for k in row)
    return [c for c in LEADING_COLUMNS if c in present] + sorted(k for k in present if k not in LEADING_COLUMNS)


def records_to_csv(records: list[dict]) -> str:
    rows = [flat_row(r) for r in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def load_records(folder: str | Path) -> list[dict]:
    """Finished runs of a study folder (its database) or of any folder with a ``results.jsonl`` (the demo's, say)."""
    folder = Path(folder)
    if (folder / DB_FILE).exists():
        store = StudyStore(folder / DB_FILE)
        try:
            records = study_records(store)
        finally:
            store.close()
        compare_with_controls(folder, records)
        return records
    if (folder / "results.jsonl").exists():
        from .results import read_records

        return read_records(folder / "results.jsonl")
    raise DataError(f"{folder} holds neither a study ({DB_FILE}) nor results.jsonl; run 'ktransfer study' or 'ktransfer demo' into it first")


def load_results(folder: str | Path, include_failed: bool = False):
    """The finished runs as a pandas DataFrame, one row per run (columns as in ``results.csv``).

    With ``include_failed`` the failed runs of a study come too, with ``status`` and ``error``.
    """
    pandas = require("pandas", "study", "load_results")
    folder = Path(folder)
    rows = [{**flat_row(r), "status": "done"} for r in load_records(folder)]
    if include_failed and (folder / DB_FILE).exists():
        store = StudyStore(folder / DB_FILE)
        try:
            plan = store.get_meta("plan")
            for row in store.rows("study", keys=plan) if plan is not None else store.rows("study"):
                if row["status"] == "failed":
                    config = json.loads(row["config"])
                    rows.append({
                        "student": row["student"], "teacher": row["teacher"], "method": row["method"], "seed": row["seed"],
                        "epochs": config["epochs"], "lr": config["lr"], **{f"hparam_{k}": v for k, v in config["params"].items()},
                        "status": "failed", "error": row["error"], "run_key": row["key"],
                    })
        finally:
            store.close()
    return pandas.DataFrame(rows, columns=_columns(rows) if rows else list(LEADING_COLUMNS))


def failed_runs(folder: str | Path) -> list[dict]:
    """Failed runs of a study folder (empty for a folder without a study database)."""
    folder = Path(folder)
    if not (folder / DB_FILE).exists():
        return []
    store = StudyStore(folder / DB_FILE)
    try:
        return [
            {"phase": row["phase"], "student": row["student"], "teacher": row["teacher"], "method": row["method"], "seed": row["seed"], "error": row["error"]}
            for row in store.rows() if row["status"] == "failed"
        ]
    finally:
        store.close()


__all__ = [
    "DataConfig", "MethodConfig", "RunSpec", "SearchConfig", "Study", "StudyConfig", "StudyError", "StudyStore", "failed_runs",
    "load_records", "load_results", "register_data_source", "stratified_split",
]
