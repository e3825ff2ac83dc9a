"""The embedded demo: train (or reload) the zoo, measure complementary knowledge, transfer every pair.

Computation lives in :func:`run_demo`; the console only shows what it does.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .api import transfer
from .engine import check_device
from .data import fashion_mnist
from .analysis import analyze_predictions
from .errors import ConfigError, KTransferError
from .methods import create_method, transfer_method_names
from .metrics import accuracy, flip_matrices
from .models.base import Model
from .models.store import DEFAULT_ZOO, load_zoo_model
from .predictions import PredictionCache
from .results import append_record, read_records, summarize
from . import tables

PROFILES = {
    # The full profile: every ordered pair of the six zoo models.
    "full": {"students": list(DEFAULT_ZOO), "teachers": list(DEFAULT_ZOO), "epochs": 3},
    # The quick profile: three students of three families, two epochs.
    "quick": {"students": ["cnn", "vit", "mixer"], "teachers": list(DEFAULT_ZOO), "epochs": 2},
}
DEFAULT_METHODS = ["kl", "kl_dp"]
DEMO_LR = 1e-3  # SGD; the zoo is far from converged, so 3 epochs at the paper's 1e-4 would barely move it


@dataclass
class DemoOptions:
    profile: str = "full"
    out: Path = Path("ktransfer-demo")
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int | None = None
    lr: float = DEMO_LR
    seed: int = 0
    students: list[str] | None = None
    teachers: list[str] | None = None
    data_dir: str | None = None
    batch_size: int = 128
    device: str = "cpu"

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
        check_device(self.device)
        return self


def _run_key(record: dict) -> tuple:
    return (record["student"], record["teacher"], record["method"], record["epochs"], record["lr"], record["seed"], json.dumps(record["hparams"], sort_keys=True))


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

    results_path = out / "results.jsonl"
    previous = {}
    if results_path.exists():
        previous = {_run_key(r): r for r in read_records(results_path)}
    pairs = [(s, t) for s in options.students for t in options.teachers if s != t]
    runs = [(s, t, m) for s, t in pairs for m in options.methods]
    records = []
    reused = 0
    transfer_started = time.perf_counter()
    with _progress(console) as progress:
        overall = progress.add_task("transfers", total=len(runs))
        for student, teacher, method in runs:
            method_obj = create_method(method)
            key = (f"zoo:{student}", f"zoo:{teacher}", method, options.epochs, options.lr, options.seed, json.dumps(method_obj.describe(), sort_keys=True))
            if key in previous:
                records.append(previous[key])
                reused += 1
                progress.advance(overall)
                continue
            progress.update(overall, description=f"{method}: {teacher} → {student}")
            result = transfer(
                models[student], models[teacher], splits.transfer, splits.eval, method=method_obj,
                epochs=options.epochs, lr=options.lr, seed=options.seed, batch_size=options.batch_size, cache=cache, device=options.device,
            )
            record = result.metrics
            append_record(results_path, record)
            records.append(record)
            progress.console.print(
                f"  {method:<11} {teacher:>8} → {student:<8} Δ {record['delta']:+5.2f}  gain {record['knowledge_gain']:4.2f}  loss {record['knowledge_loss']:4.2f}  ({record['seconds']:.1f}s)"
            )
            progress.advance(overall)
    transfer_seconds = time.perf_counter() - transfer_started
    if reused:
        console.print(f"reused {reused} finished transfers from {results_path}")

    console.print(tables.pairs_table(records, len(splits.eval)))
    summary = summarize(records)
    console.print(tables.summary_table(summary, len(splits.eval)))
    timing = {"zoo_seconds": zoo_seconds, "transfer_seconds": transfer_seconds, "total_seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps({"options": _jsonable(options), "methods": summary, "timing": timing}, indent=2, default=str))
    console.print(f"zoo {zoo_seconds:.0f}s, transfers {transfer_seconds:.0f}s, total {timing['total_seconds']:.0f}s. Results: [bold]{results_path}[/]")
    write_report(out, console)
    return {"records": records, "summary": summary, "zoo": zoo_rows, "timing": timing, "out": out}


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
