"""The embedded demo: train (or reload) the zoo, measure complementary knowledge, transfer every pair.

Every student also runs the two controls (``ce``: fine-tuning on the labels; ``self``: KL+DP toward
the original alone) with the same data, budget and seed, and every Δ carries its McNemar p-value,
so a reader can tell what the teacher added. Computation lives in :func:`run_demo`; the console
only shows what it does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .api import transfer
from .controls import CONTROLS, attach_controls, control_method, load_predictions, run_control, save_predictions
from .engine import check_device
from .data import fashion_mnist
from .analysis import analyze_predictions
from .errors import ConfigError, KTransferError
from .methods import create_method, transfer_method_names
from .metrics import accuracy, flip_matrices
from .models.base import Model
from .models.store import DEFAULT_ZOO, load_zoo_model
from .predictions import PredictionCache
from .results import append_record, is_control, read_records, summarize, summarize_controls, write_records
from . import tables

PROFILES = {
    # The full profile: every ordered pair of the six zoo models.
    "full": {"students": list(DEFAULT_ZOO), "teachers": list(DEFAULT_ZOO), "epochs": 3},
    # The quick profile: three students of three families, two epochs.
    "quick": {"students": ["cnn", "vit", "mixer"], "teachers": list(DEFAULT_ZOO), "epochs": 2},
}
DEFAULT_METHODS = ["kl", "kl_dp"]
# SGD learning rate of every demo transfer and control, chosen on the validation split (the 10k training
# images the zoo never saw) over a few held-out pairs, never on the test set: see docs/demo.md.
DEMO_LR = 3e-3


@dataclass
class DemoOptions:
    profile: str = "full"
    out: Path = Path("ktransfer-demo")
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int | None = None
    lr: float = DEMO_LR
    seeds: list[int] = field(default_factory=lambda: [0])
    setting: str = "paper"  # paper: transfer on data the zoo trained on; new-data: on the 10k images it never saw
    controls: bool = True
    augment: str = "none"
    students: list[str] | None = None
    teachers: list[str] | None = None
    data_dir: str | None = None
    batch_size: int = 128
    device: str = "cpu"
    guard: bool = False  # transfers and controls return their best epoch on validation data (docs/guard.md)

    def resolve(self) -> "DemoOptions":
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; choose one of: {', '.join(PROFILES)}")
        profile = PROFILES[self.profile]
        self.students = self.students or list(profile["students"])
        self.teachers = self.teachers or list(profile["teachers"])
        self.epochs = self.epochs or profile["epochs"]
        for name in [*self.students, *self.teachers]:
            if name not in DEFAULT_ZOO:
                raise ConfigError(f"unknown zoo model {name!r}; the zoo has: {', '.join(DEFAULT_ZOO)}")
        if "all" in self.methods:  # every transfer method, in place of "all"
            position = self.methods.index("all")
            expanded = [*self.methods[:position], *transfer_method_names(), *self.methods[position + 1 :]]
            self.methods = list(dict.fromkeys(expanded))
        for method in self.methods:
            create_method(method)  # unknown names fail here, before any training
        if self.setting not in fashion_mnist.SETTINGS:
            raise ConfigError(f"unknown setting {self.setting!r}; choose one of: {', '.join(fashion_mnist.SETTINGS)}")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        self.seeds = list(dict.fromkeys(self.seeds))
        check_device(self.device)
        return self


def _run_key(record: dict) -> str:
    """What makes two demo runs the same run: reused from results.jsonl instead of being run again."""
    fields = [record[k] for k in ("student", "teacher", "method", "epochs", "lr", "seed", "transfer_data")]
    fields += [record.get("augment", "none"), bool(record.get("control")), json.dumps(record["hparams"], sort_keys=True)]
    if record.get("guard_source"):  # only then, so that unguarded runs keep their keys
        fields.append(record["guard_source"])
    return hashlib.blake2b(json.dumps(fields, default=str).encode(), digest_size=8).hexdigest()


def load_zoo(names: list[str], data_dir, console: Console) -> dict[str, Model]:
    """The named zoo models, trained now (with a progress bar each) or reloaded from the cache."""
    models = {}
    with _progress(console) as progress:
        for name in names:
            task = progress.add_task(f"zoo: {name}", total=None)
            models[name] = load_zoo_model(name, data_dir, on_step=lambda step, total, task=task: progress.update(task, completed=step, total=total))
            progress.update(task, completed=1, total=1, description=f"zoo: {name} ready")
    return models


def run_demo(options: DemoOptions, console: Console | None = None) -> dict:
    console = console or Console()
    options.resolve()
    started = time.perf_counter()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = fashion_mnist.load(options.data_dir)
    console.print(f"[bold]Fashion-MNIST[/]: pretraining pool {len(splits.pool):,}, transfer set {len(splits.transfer):,}, evaluation set {len(splits.eval):,} images")

    names = list(dict.fromkeys([*options.students, *options.teachers]))
    models = load_zoo(names, options.data_dir, console)
    zoo_seconds = time.perf_counter() - started

    cache = PredictionCache()
    predictions = {name: cache.predictions(model, splits.eval) for name, model in models.items()}
    zoo_rows = [
        {"name": name, "family": models[name].family, "parameters": models[name].num_parameters, "accuracy": accuracy(splits.eval.labels, predictions[name])}
        for name in names
    ]
    (out / "zoo.json").write_text(json.dumps(zoo_rows, indent=2))
    console.print(tables.zoo_table(zoo_rows, len(splits.eval)))

    matrix_names, positive, negative = flip_matrices(splits.eval.labels, predictions)
    # The flip matrices plus per-class counts (the format of `ktransfer analyze --out`), for the report.
    analyze_predictions(splits.eval.labels, predictions, splits.eval.class_names).save(out / "complementarity.json")
    console.print(tables.flip_matrix_table(matrix_names, positive, len(splits.eval)))

    transfer_set = splits.transfer_set(options.setting)
    results_path, predictions_dir = out / "results.jsonl", out / "predictions"
    previous = {}
    if results_path.exists():
        previous = {_run_key(r): r for r in read_records(results_path)}
    pairs = [(s, t) for s in options.students for t in options.teachers if s != t]
    # Controls first, so each transfer's comparison with them is known the moment it finishes.
    runs = [(seed, s, None, c) for seed in options.seeds for s in options.students for c in (CONTROLS if options.controls else ())]
    runs += [(seed, s, t, m) for seed in options.seeds for s, t in pairs for m in options.methods]
    settings = {"epochs": options.epochs, "lr": options.lr, "batch_size": options.batch_size, "device": options.device, "augment": options.augment, "cache": cache}
    if options.guard:  # the validation split, unless the transfer trains on it (new-data): then a held-out share
        settings.update(guard=True, val_data=splits.validation if transfer_set is not splits.validation else None)
    records, predictions = [], {}
    reused = 0
    transfer_started = time.perf_counter()
    with _progress(console) as progress:
        overall = progress.add_task("transfers", total=len(runs))
        for seed, student, teacher, method in runs:
            planned = _planned_record(student, teacher, method, options, seed, transfer_set.name)
            if options.guard:
                planned["guard_source"] = "holdout" if settings["val_data"] is None else "val_data"
            key = _run_key(planned)
            saved = load_predictions(predictions_dir, key) if key in previous else None
            if saved is not None:
                records.append(previous[key])
                predictions[id(previous[key])] = saved
                reused += 1
                progress.advance(overall)
                continue
            progress.update(overall, description=f"{method}: {teacher or 'no teacher'} → {student}" + (f" (seed {seed})" if len(options.seeds) > 1 else ""))
            if teacher is None:
                result = run_control(method, models[student], transfer_set, splits.eval, seed=seed, **settings)
            else:
                result = transfer(models[student], models[teacher], transfer_set, splits.eval, method=create_method(method), seed=seed, **settings)
            record = {**result.metrics, "setting": options.setting, "control": teacher is None}
            predictions[id(record)] = result.predictions
            records.append(record)
            if teacher is not None:  # its controls ran first: compare it with them now, for the line below
                attach_controls([*(r for r in records if is_control(r)), record], predictions, splits.eval.labels)
            save_predictions(predictions_dir, _run_key(record), result.predictions)
            append_record(results_path, record)
            progress.console.print(_run_line(record))
            progress.advance(overall)
    transfer_seconds = time.perf_counter() - transfer_started
    if reused:
        console.print(f"reused {reused} finished runs from {results_path}")
    # Reused records get their comparisons again (their controls may be new), and the file holds exactly this run's records.
    attach_controls(records, predictions, splits.eval.labels)
    write_records(results_path, records)

    n_eval = len(splits.eval)
    console.print(tables.pairs_table(records, n_eval))
    control_summary = summarize_controls(records)
    if control_summary:
        console.print(tables.controls_table(control_summary, n_eval))
    summary = summarize(records)
    console.print(tables.summary_table(summary, n_eval, with_controls=bool(control_summary)))
    timing = {"zoo_seconds": zoo_seconds, "transfer_seconds": transfer_seconds, "total_seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps({"options": _jsonable(options), "methods": summary, "controls": control_summary, "timing": timing}, indent=2, default=str))
    console.print(f"zoo {zoo_seconds:.0f}s, transfers {transfer_seconds:.0f}s, total {timing['total_seconds']:.0f}s. Results: [bold]{results_path}[/]")
    write_report(out, console)
    return {"records": records, "summary": summary, "controls": control_summary, "zoo": zoo_rows, "timing": timing, "out": out}


def _planned_record(student: str, teacher: str | None, method: str, options: DemoOptions, seed: int, transfer_data: str) -> dict:
    """The fields of a run's future record that identify it (see :func:`_run_key`)."""
    hparams = (control_method(method) if teacher is None else create_method(method)).describe()
    return {
        "student": f"zoo:{student}", "teacher": f"zoo:{teacher}" if teacher else None, "method": method, "epochs": options.epochs,
        "lr": options.lr, "seed": seed, "transfer_data": transfer_data, "augment": options.augment, "control": teacher is None, "hparams": hparams,
    }


def _run_line(record: dict) -> str:
    student = str(record["student"]).removeprefix("zoo:")
    teacher = str(record["teacher"]).removeprefix("zoo:") if record.get("teacher") else "(control)"
    line = f"  {record['method']:<11} {teacher:>9} → {student:<8} Δ {record['delta']:+5.2f} (p {record['p_value']:.2g})"
    if record.get("delta_vs_control") is not None:
        line += f"  vs ce {record['delta_vs_control']:+5.2f}"
    if record.get("delta_vs_self") is not None:
        line += f"  vs self {record['delta_vs_self']:+5.2f}"
    if record.get("ensemble_delta") is not None:
        line += f"  ens Δ {record['ensemble_delta']:+5.2f}"
    if "guard_epoch" in record:
        line += "  guard: " + ("original kept" if record["guard_epoch"] == 0 else f"epoch {record['guard_epoch']}")
    return line + f"  ({record['seconds']:.1f}s)"


def write_report(out: Path, console: Console) -> None:
    """End with the HTML report where the report extra is installed; otherwise say how to get it."""
    from .report import build_report, report_available

    if not report_available():
        console.print(f"For an HTML report of these results: pip install 'ktransfer[report]', then ktransfer report {out}", markup=False)
        return
    try:
        report = build_report(out)
    except KTransferError as exc:  # the results are saved already; a report problem must not hide them
        console.print(f"[yellow]No report: {exc}[/]")
        return
    console.print(f"Report: [bold]{report.html}[/] (open it in a browser; the figures are also saved as PNG beside it)")


def _jsonable(options: DemoOptions) -> dict:
    data = asdict(options)
    data["out"] = str(options.out)
    return data


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )
