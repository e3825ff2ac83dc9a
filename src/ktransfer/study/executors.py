"""Where a study's runs execute: one after another in this process, in worker processes of this machine, or as Ray tasks.

Either way each run is one :func:`ktransfer.transfer` call (or one control) through
:func:`execute_run`, and the executor hands each outcome back to the runner, the only process that
writes the study's store. An executor calls ``on_start(run)`` just before a run is started or
submitted, and ``on_finish(run, outcome)`` when it has ended.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import torch

from ..api import transfer
from ..controls import run_control
from ..extras import start_ray as _start_ray
from ..models import load_model
from ..predictions import PredictionCache
from .config import StudyConfig
from .plan import RunSpec
from .sources import StudyData, search_split


@dataclass
class RunOutcome:
    """What a run gives back: its metrics and evaluation predictions, or the error that ended it."""

    metrics: dict | None = None
    predictions: torch.Tensor | None = None
    error: str | None = None
    trace: str | None = None


def execute_run(run: RunSpec, models, data: StudyData, device: str, cache: PredictionCache) -> RunOutcome:
    """One run of a study, in whatever process holds ``models`` and ``data``; a failure is returned, not raised."""
    # With the guard: on the source's validation data, else on a held-out share of the transfer data (ktransfer.transfer_checks.guard_data).
    given = dict(cache=cache, val_data=data.validation if run.guard else None, **run.tracking())
    try:
        settings = run.transfer_settings(device)
        if run.control:
            result = run_control(run.control, models[run.student], data.transfer, data.eval, settings, **given)
        else:
            result = transfer(models[run.student], models[run.teacher], data.transfer, data.eval, run.method, settings, method_params=run.params, **given)
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the study goes on
        return RunOutcome(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    return RunOutcome(result.metrics, result.predictions)


Start = Callable[[RunSpec], None]
Finish = Callable[[RunSpec, RunOutcome], None]


class LocalExecutor:
    """The runs one after another in this process, with the models and data the runner loaded."""

    name = "local"

    def __init__(self, models: dict, data: dict[str, StudyData], device: str, cache: PredictionCache):
        self.models, self.data, self.device, self.cache = models, data, device, cache

    def run(self, runs: list[RunSpec], on_start: Start, on_finish: Finish) -> None:
        for run in runs:
            on_start(run)
            on_finish(run, execute_run(run, self.models, self.data[run.phase], self.device, self.cache))

    def close(self) -> None:
        pass


# ------------------------------------------------------------- worker processes (processes and Ray)


class _WorkerState:
    """What a worker process (of the processes executor or Ray) builds once and reuses for every run it gets: the data and the models, loaded as runs need them."""

    def __init__(self, config: StudyConfig, device: str):
        self.config, self.device = config, device
        self.cache = PredictionCache()  # on disk: teacher logits computed once per machine, shared by its workers
        study = config.data.load(guard=config.guard)
        self.data = {"study": study}
        if config.searched_methods():
            self.data["search"] = search_split(study, config.search.holdout, config.search.seed)
        self.loaded: dict = {}

    def model(self, spec: str):
        if spec not in self.loaded:
            self.loaded[spec] = load_model(spec, data_dir=self.config.data.dir)
            self.loaded[spec].module.to(self.device)
        return self.loaded[spec]


_WORKER_STATES: dict[str, _WorkerState] = {}  # per worker process, keyed by the config it serves


def _run_in_worker(config: dict, run: RunSpec, device: str) -> RunOutcome:
    import json

    key = json.dumps([config, device], sort_keys=True)
    if key not in _WORKER_STATES:
        _WORKER_STATES.clear()  # a worker serves one study at a time
        _WORKER_STATES[key] = _WorkerState(StudyConfig.from_dict(config), device)
    state = _WORKER_STATES[key]
    models = {spec: state.model(spec) for spec in (run.student, run.teacher) if spec}
    return execute_run(run, models, state.data[run.phase], device, state.cache)


# ------------------------------------------------------------------------------------ processes


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# A spawned worker is a fresh Python process: what the driver changed in memory (a test's monkeypatch,
# a registered data source or model) is not there. MODULE:FUNCTION in this variable names a function
# that every worker calls once when it starts, before any run, to set such things up again.
WORKER_SETUP_ENV = "KTRANSFER_WORKER_SETUP"


def worker_setup(target: str) -> Callable[[], object]:
    """The function ``MODULE:FUNCTION`` names; a clear error where it cannot be found (checked in the driver, before any worker starts)."""
    import importlib

    from ..errors import ConfigError

    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"{WORKER_SETUP_ENV} must be MODULE:FUNCTION, e.g. my_setup:setup; got {target!r}")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{WORKER_SETUP_ENV}={target}: {exc}; put the module on PYTHONPATH or unset the variable") from None
    if not callable(function):
        raise ConfigError(f"{WORKER_SETUP_ENV}={target} is not a function")
    return function


def run_worker_setup(target: str | None) -> None:
    """Call the function ``MODULE:FUNCTION`` names (nothing for an empty target)."""
    if target:
        worker_setup(target)()


def _start_worker(threads: int, setup: str | None = None) -> None:
    # Each worker computes with as many threads as CPUs it was given, so that workers do not fight
    # over cores: independent runs in parallel processes beat one run's intra-op threads.
    torch.set_num_threads(threads)
    run_worker_setup(setup)


def worker_pool(workers: int, threads: int = 1, setup: str | None = None) -> ProcessPoolExecutor:
    """``workers`` fresh (spawned) worker processes with ``threads`` threads each, each set up by the function
    ``setup`` names (``MODULE:FUNCTION``; default: ``KTRANSFER_WORKER_SETUP``, if set)."""
    setup = setup if setup is not None else os.environ.get(WORKER_SETUP_ENV) or None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(threads, setup))


class ProcessExecutor:
    """The runs in worker processes on this machine, as many at once as ``cpus_per_run`` fits in its CPUs.

    No extra is needed. Each worker is a fresh (spawned) Python process that loads the study's
    data and models once and serves run after run, with ``cpus_per_run`` threads; teacher logits
    come from the shared on-disk prediction cache. A worker first calls the function named by
    ``KTRANSFER_WORKER_SETUP`` (``MODULE:FUNCTION``, read when the executor is made), if set. A worker
    that dies (killed, out of memory) takes the pool with it: the runs in flight are then run again one
    at a time in a new pool, and a run that kills its worker while alone is tried up to ``max_retries``
    more times, then recorded failed.
    """

    name = "processes"

    def __init__(self, config: StudyConfig, device: str, workers: int | None = None):
        self.config, self.device = config, device
        self.threads = max(1, int(config.cpus_per_run))
        self.workers = workers or max(1, usable_cpus() // self.threads)
        self.payload = config.to_dict()
        self.setup = os.environ.get(WORKER_SETUP_ENV) or None
        if self.setup:
            worker_setup(self.setup)  # a wrong name fails here, in one line, not as dying workers
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return worker_pool(self.workers, self.threads, self.setup)

    def slots(self) -> int:
        return self.workers

    def run(self, runs: list[RunSpec], on_start: Start, on_finish: Finish) -> None:
        # A dead worker breaks the whole pool, and every run in flight then fails alike, so the culprit
        # is unknown: those runs become suspects and run again one at a time, and only a run that kills
        # its pool while alone in it is charged with a try.
        waiting, suspects, in_flight, tries, started = list(runs), [], {}, {}, set()
        while waiting or suspects or in_flight:
            while (suspects and not in_flight) or (not suspects and waiting and len(in_flight) < self.workers):
                run = suspects.pop(0) if suspects else waiting.pop(0)
                if run.key not in started:
                    started.add(run.key)
                    on_start(run)
                in_flight[self.pool.submit(_run_in_worker, self.payload, run, self.device)] = run
            alone = len(in_flight) == 1
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                run = in_flight.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken = True
                    if alone:
                        tries[run.key] = tries.get(run.key, 0) + 1
                        if tries[run.key] > self.config.max_retries:
                            on_finish(run, RunOutcome(error=f"its worker process died (tried {tries[run.key]} times)"))
                            continue
                    suspects.append(run)
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back: recorded, the study goes on
                    outcome = RunOutcome(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
                on_finish(run, outcome)
            if broken:  # the pool is dead: what is still in it is suspect too; start afresh
                suspects.extend(in_flight.values())
                in_flight.clear()
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = self._new_pool()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ Ray


def start_ray(address: str | None = None):
    return _start_ray(address, "running a study on Ray (--executor ray)")


class RayExecutor:
    """Each run as a Ray task with the config's resources; as many in flight as the cluster's resources hold."""

    name = "ray"

    def __init__(self, config: StudyConfig, device: str, address: str | None = None):
        self.config, self.device = config, device
        self.ray, self.owned = start_ray(address)
        self.payload = self.ray.put(config.to_dict())  # shipped once, not with every task
        self.task = self.ray.remote(_run_in_worker).options(
            num_cpus=config.cpus_per_run, num_gpus=config.gpus_per_run, max_retries=config.max_retries, retry_exceptions=False
        )

    def slots(self) -> int:
        """How many runs the cluster can hold at once with the resources each asks for."""
        resources = self.ray.cluster_resources()
        slots = math.floor(resources.get("CPU", 0) / self.config.cpus_per_run + 1e-9)
        if self.config.gpus_per_run > 0:
            slots = min(slots, math.floor(resources.get("GPU", 0) / self.config.gpus_per_run + 1e-9))
        return max(1, slots)

    def run(self, runs: list[RunSpec], on_start: Start, on_finish: Finish) -> None:
        ray, waiting, in_flight = self.ray, list(runs), {}
        slots = self.slots()
        while waiting or in_flight:
            while waiting and len(in_flight) < slots:  # submit only what can start, so "running" in the store means running
                run = waiting.pop(0)
                on_start(run)
                in_flight[self.task.remote(self.payload, run, self.device)] = run
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                run = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died more often than max_retries allows: recorded, the study goes on
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    outcome = RunOutcome(error=f"{type(exc).__name__}: {first} (after {self.config.max_retries} retries)", trace=str(exc))
                on_finish(run, outcome)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def make_executor(name: str, config: StudyConfig, device: str, models: dict, data: dict[str, StudyData], cache: PredictionCache, address: str | None = None):
    if name == "ray":
        return RayExecutor(config, device, address)
    if name == "processes":
        return ProcessExecutor(config, device)
    return LocalExecutor(models, data, device, cache)
