"""Running a study: plan its runs, hand them to an executor, record each outcome as it arrives.

Each run is one call of :func:`ktransfer.transfer`; its record (the ``results.jsonl`` schema, history
included), its full config, its status (pending, running, done, failed) and its error live in an
SQLite file in the study folder, written by this process alone as runs start and end. Running the
study again skips what is done and redoes what was interrupted (``running`` when no process holds
the study). Methods given as a grid are first searched on a few pairs, scored on a held-out part of
the transfer data (never the evaluation set); the setting with the best mean Δ then serves every pair
(paper, appendix A).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from ..analysis import analyze
from ..controls import save_predictions
from ..models import load_model
from ..models.base import Model
from ..predictions import PredictionCache
from .config import StudyConfig
from .plan import CONTROL_PREFIX, RunSpec, setting_label
from .executors import RunOutcome, make_executor
from .export import compare_with_controls, records_to_csv
from .sources import StudyData, search_split
from .store import CONFIG_FILE, DB_FILE, LABELS_KEY, PREDICTIONS_DIR, STATUSES, StudyStore, _exclusive, _is_locked, _record_of, study_records
from ..paths import atomic_write_bytes
from ..results import write_records

Logger = Callable[[str], None]
# Called as each run ends: the run, its record (comparisons with the controls included; None for a failed
# run), its error (None for a finished run), how many of the runs to do have ended, and how many there are.
RunCallback = Callable[[RunSpec, "dict | None", "str | None", int, int], None]
# Called once the models are loaded and analysed, before any run: the complementarity analysis and the zoo rows.
AnalysisCallback = Callable[[object, list[dict]], None]


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
            self.config.batch_size, self.config.targets, json.dumps(data, sort_keys=True), self.config.augment, self.config.guard,
            _json_or_empty(self.config.run_settings()), _json_or_empty(self.config.runtime_settings()),
            json.dumps({"loggers": self.config.log, "folder": str(self.folder.resolve()), "tags": {"study": self.config.name}}) if self.config.log else "",
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

    def run(
        self, retry_failed: bool = False, log: Logger | None = None, device: str | None = None, executor: str | None = None, address: str | None = None,
        on_run: RunCallback | None = None, on_analysis: AnalysisCallback | None = None,
    ) -> dict:
        """Run every run that is not done yet; returns :meth:`status` at the end.

        ``executor`` (default: the config's) is ``local`` (this process, one run after another),
        ``processes`` (worker processes of this machine) or ``ray`` (Ray tasks, on the cluster at
        ``address`` or a local instance): see docs/scale.md. ``on_run`` is told of each run as it
        ends (then the log has no line of its own for a finished run); ``on_analysis`` gets the
        models' analysis before any run (see :data:`RunCallback`, :data:`AnalysisCallback`).
        """
        log = log or print
        self.folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.folder):
            self._write_config()
            store = StudyStore(self.folder / DB_FILE)
            try:
                self._run(store, retry_failed, log, device or self.config.device, executor or self.config.executor, address, on_run, on_analysis)
            finally:
                store.close()
        return self.status()

    def _write_config(self) -> None:
        try:
            import yaml
        except ImportError:  # JSON is YAML too: the file stays readable where ktransfer[study] is installed later
            text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        else:
            text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        (self.folder / CONFIG_FILE).write_text("# The config this study last ran with; `ktransfer study FOLDER` reruns it.\n" + text)

    def _run(self, store: StudyStore, retry_failed: bool, log: Logger, device: str, executor_name: str, address: str | None, on_run: RunCallback | None, on_analysis: AnalysisCallback | None) -> None:
        started = time.perf_counter()
        data = self.config.data.load(guard=self.config.guard)
        log(f"data: transfer set {len(data.transfer):,} images, evaluation set {len(data.eval):,} images ({self.config.data.source})")
        search_plan = self.search_plan()
        phase_data = {"study": data}
        if search_plan:  # before any model runs: held-out data that overlaps the evaluation set is refused
            phase_data["search"] = search_split(data, self.config.search.holdout, self.config.search.seed)
        cache = PredictionCache()
        models = {spec: load_model(spec, data_dir=self.config.data.dir) for spec in self.config.models()}  # bad specs fail before any run
        for model in models.values():
            model.module.to(device)  # the analysis and the frozen teachers run where the students train
        analysis, zoo_rows = self._write_analysis(models, data, cache, device)
        if on_analysis is not None:
            on_analysis(analysis, zoo_rows)
        save_predictions(self.folder / PREDICTIONS_DIR, LABELS_KEY, data.eval.labels)

        executor = make_executor(executor_name, self.config, device, models, phase_data, cache, address)
        try:
            if executor.name != "local":
                log(f"executor: {executor.name}, {executor.slots()} run(s) at a time")
            if search_plan:
                runs = [run for settings in search_plan.values() for _, method_runs in settings for run in method_runs]
                store.add(runs)
                log(f"hyperparameter search: {len(runs)} runs on {len(self.config.search_pairs())} pairs, scored on {len(phase_data['search'].eval):,} held-out transfer images")
                self._execute(store, runs, executor, retry_failed, log, on_run=on_run)
            chosen, tables = self.choose(store)  # the study phase starts once the search's choice is known
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
            self._execute(store, runs, executor, retry_failed, log, export=True, on_run=on_run)
        finally:
            executor.close()
        self.export(store)
        log(f"finished in {time.perf_counter() - started:.0f}s; results in {self.folder / 'results.csv'}")

    def _execute(self, store: StudyStore, runs: list[RunSpec], executor, retry_failed: bool, log: Logger, export: bool = False, on_run: RunCallback | None = None) -> None:
        todo, reused = [], 0
        for run in runs:
            status = store.status(run.key)
            reused += status == "done"
            if status == "done" or (status == "failed" and not retry_failed):
                continue
            if status == "running":
                log(f"redoing interrupted run: {run.describe()}")
            todo.append(run)
        if reused:
            log(f"reused {reused} finished runs of {len(runs)} from {self.folder / DB_FILE}")
        finished = 0

        def on_start(run: RunSpec) -> None:
            store.mark_running(run.key)

        def on_finish(run: RunSpec, outcome: RunOutcome) -> None:
            nonlocal finished
            finished += 1
            if outcome.error is not None:
                store.mark_failed(run.key, outcome.error, outcome.trace or "")
                log(f"[{finished}/{len(todo)}] FAILED {run.describe()}: {outcome.error}")
                if on_run is not None:
                    on_run(run, None, outcome.error, finished, len(todo))
                return
            record = {**outcome.metrics, "study": self.config.name, "phase": run.phase, "run_key": run.key, "control": bool(run.control)}
            if self.config.data.scheme == "fashion-mnist":
                record["setting"] = self.config.data.setting
            if outcome.predictions is not None:  # for the paired comparisons with the controls
                save_predictions(self.folder / PREDICTIONS_DIR, run.key, outcome.predictions)
            store.mark_done(run.key, record)
            if export:  # the record as exported, with its comparisons to the controls that ran before it
                record = next((r for r in self.export(store) if r.get("run_key") == run.key), record)
            if on_run is not None:
                on_run(run, record, None, finished, len(todo))
                return
            log(
                f"[{finished}/{len(todo)}] {run.describe()}: Δ {record['delta']:+.2f}  gain {record['knowledge_gain']:.2f}  "
                f"loss {record['knowledge_loss']:.2f}  ({record['seconds']:.1f}s)"
            )

        executor.run(todo, on_start, on_finish)

    def _write_analysis(self, models: dict[str, Model], data: StudyData, cache: PredictionCache, device: str) -> tuple:
        analysis = analyze(models, data.eval, cache, device=device)
        analysis.save(self.folder / "complementarity.json")
        zoo_rows = [
            {"name": spec, "family": model.family, "parameters": model.num_parameters, "accuracy": analysis.accuracy[spec]}
            for spec, model in models.items()
        ]
        (self.folder / "zoo.json").write_text(json.dumps(zoo_rows, indent=2))
        return analysis, zoo_rows

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


def _json_or_empty(values: dict) -> str:
    return json.dumps(values, sort_keys=True) if values else ""
