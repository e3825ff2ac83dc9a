"""Experiment tracking: a transfer's numbers sent to TensorBoard, MLflow, Weights & Biases or Trackio.

A :class:`Tracking` callback of the engine logs, per optimiser step, the loss and the method's
statistics (``train/loss``, ``train/<stat>``), per epoch the numbers of the epoch's record
(``epoch/acc_after``, ``epoch/delta``, ``epoch/train_loss``, ...), and, once, the run's settings
(as parameters or config) and the final record's numbers (``final/<key>``). Step values are read
back from the device in batches of :data:`READ_EVERY` steps, so a GPU is not stalled each step.

Each tracker is its own extra (``pip install 'ktransfer[tensorboard]'``, ``[mlflow]``, ``[wandb]``,
``[trackio]``). A tracker that fails does not stop the run: the failure is one warning, and the run
and its record go on without that tracker.

Where each writes (``folder`` is ``--out`` in the CLI, the study's folder in a study, and the
current directory in the Python API unless ``tracking_dir`` is given):

- ``tensorboard``: event files in ``folder/tensorboard/<run name>`` (``tensorboard --logdir folder/tensorboard``);
- ``mlflow``: the server of ``MLFLOW_TRACKING_URI`` if set, else a local file store in ``folder/mlruns``;
- ``wandb``: online when an API key is configured (``WANDB_API_KEY``, ``wandb login``) or
  ``WANDB_MODE`` says so, else offline, into ``folder/wandb`` (``wandb sync`` uploads it later);
- ``trackio``: Trackio's local database (``TRACKIO_DIR``, or its default), ``trackio show`` to view.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoints import flatten
from .engine.callbacks import Callback
from .errors import ConfigError
from .extras import TRACKERS, require

PROJECT = "ktransfer"
READ_EVERY = 50  # steps whose values are read back from the device at once


def numbers(record: dict, prefix: str) -> dict[str, float]:
    """The finite real numbers of a record (booleans and text left out), keyed ``prefix/key``."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"{prefix}/{key}"] = float(value)
    return out


def flat_settings(settings: dict) -> dict[str, str]:
    """Nested settings as ``a.b`` keys with text values (what MLflow's parameters and TensorBoard's text take)."""
    return {key: value if isinstance(value, str) else json.dumps(value, default=str) for key, value in flatten(settings).items()}


class Tracker:
    """One run in one tracker. ``start`` once, then ``log`` any number of times, then ``finish`` once."""

    name = "tracker"

    def start(self, run_name: str, settings: dict, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, final: dict[str, float], step: int, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder) / "tensorboard"

    def start(self, run_name, settings, tags):
        require("tensorboard", "tensorboard", "--log tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # A folder per run and start, as TensorBoard's own default: a rerun is a new curve, not one drawn over the last.
        self.writer = SummaryWriter(log_dir=str(self.folder / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        table = "\n".join(f"| {key} | {value} |" for key, value in flat_settings({**tags, **settings}).items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + table)

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, final, step, failed=False):
        self.log(final, step)
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, folder: str | Path, project: str = PROJECT):
        self.folder, self.project = Path(folder), project

    def start(self, run_name, settings, tags):
        mlflow = require("mlflow", "mlflow", "--log mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store for existing users only; with no server named, it is the one that needs none.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.folder / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(self.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        from mlflow.entities import Param

        params = [Param(key[:250], value[:6000]) for key, value in flat_settings(settings).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def finish(self, final, step, failed=False):
        self.log(final, step)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else online where an API key is configured, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, folder: str | Path, project: str = PROJECT):
        self.folder, self.project = Path(folder), project

    def start(self, run_name, settings, tags):
        wandb = require("wandb", "wandb", "--log wandb")
        self.folder.mkdir(parents=True, exist_ok=True)
        labels = [f"{key}:{value}"[:64] for key, value in tags.items()]  # W&B tags are at most 64 characters
        self.run = wandb.init(project=self.project, name=run_name, dir=str(self.folder), config=settings, tags=labels, mode=wandb_mode(), settings=wandb.Settings(silent=True))

    def log(self, values, step):
        self.run.log(values, step=step)

    def finish(self, final, step, failed=False):
        self.run.summary.update(final)
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, project: str = PROJECT):
        self.project = project

    def start(self, run_name, settings, tags):
        self.trackio = require("trackio", "trackio", "--log trackio")
        with _quiet():  # Trackio prints where it logs on standard output, which --json keeps for the records
            self.run = self.trackio.init(project=self.project, name=run_name, config={**tags, **settings})

    def log(self, values, step):
        self.run.log(values, step=step)

    def finish(self, final, step, failed=False):
        self.run.log(final, step=step)
        with _quiet():
            self.run.finish()


def _quiet():
    return contextlib.redirect_stdout(sys.stderr)


def make_tracker(name: str, folder: str | Path = ".", project: str = PROJECT) -> Tracker:
    """A tracker by name: ``tensorboard``, ``mlflow``, ``wandb`` or ``trackio``."""
    folder = Path(folder)
    makers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorBoardTracker(folder),
        "mlflow": lambda: MLflowTracker(folder, project),
        "wandb": lambda: WandbTracker(folder, project),
        "trackio": lambda: TrackioTracker(project),
    }
    if name not in makers:
        raise ConfigError(f"unknown tracker {name!r}; use {', '.join(TRACKERS)}")
    return makers[name]()


def run_name(method: str, student: str, teacher: str | None, seed: int) -> str:
    """A readable run name that is also a folder name: ``kl_dp-zoo_cnn-from-zoo_vit-seed0`` (a control: ``ce-zoo_cnn-seed0``)."""
    clean = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60]  # noqa: E731
    source = f"-from-{clean(teacher)}" if teacher is not None else ""
    return f"{clean(method)}-{clean(student)}{source}-seed{seed}"


class Tracking(Callback):
    """The engine's callback that sends a run to its trackers; a tracker that fails is dropped with one warning."""

    def __init__(self, trackers: Sequence[Tracker], warn: Callable[[str], None]):
        self.trackers, self.warn = list(trackers), warn
        self.pending: list[tuple[int, list[str], list[torch.Tensor]]] = []
        self.step = 0

    @classmethod
    def start(cls, loggers: Sequence[str | Tracker], name: str, settings: dict, tags: dict[str, str], warn: Callable[[str], None], folder: str | Path = ".", project: str = PROJECT) -> "Tracking":
        """Trackers from names (or ready :class:`Tracker` objects), each started on this run."""
        # Every tracker is made before any starts: an unknown name fails before anything is written.
        tracking = cls([make_tracker(logger, folder, project) if isinstance(logger, str) else logger for logger in loggers], warn)
        tracking._each("start", name, settings, {key: str(value) for key, value in tags.items()})
        return tracking

    def _each(self, call: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must never end a run
                self.trackers.remove(tracker)
                self.warn(f"Warning: the {tracker.name} tracker failed ({type(exc).__name__}: {exc}); the run goes on without it")

    def on_step_end(self, engine, out) -> None:
        if not self.trackers:
            return
        keys = ["train/loss", *(f"train/{key}" for key in out.stats)]
        values = [out.loss.detach(), *(value.detach() if torch.is_tensor(value) else torch.tensor(float(value)) for value in out.stats.values())]
        self.pending.append((engine.state.step, keys, values))
        self.step = engine.state.step
        if len(self.pending) >= READ_EVERY:
            self.flush()

    def flush(self) -> None:
        """Read the buffered step values back from the device in one go, and log them."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flat = [value.float().reshape(()) for _, _, values in pending for value in values]
        read = torch.stack([value.to(flat[0].device) for value in flat]).tolist()
        position = 0
        for step, keys, values in pending:
            self._each("log", dict(zip(keys, read[position : position + len(values)])), step)
            position += len(values)

    def on_epoch_end(self, engine, record: dict) -> None:
        self.flush()
        self.step = engine.state.step
        self._each("log", numbers(record, "epoch"), engine.state.step)

    def on_run_end(self, engine) -> None:
        self.flush()

    def finish(self, record: dict | None) -> None:
        """Log the final record's numbers and close every tracker (``None``: the run failed)."""
        self.flush()
        final = numbers({key: value for key, value in (record or {}).items() if key != "history"}, "final")
        self._each("finish", final, self.step, record is None)
