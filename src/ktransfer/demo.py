"""The embedded demo: train (or reload) the zoo, measure complementary knowledge, transfer every pair.

The demo is a study (:mod:`ktransfer.study`): its options become a :class:`~ktransfer.study.StudyConfig`
(a preset per profile), run by the study runner into the demo's folder, so it shares the study's
store, resume (a rerun reuses the runs whose :class:`~ktransfer.study.RunSpec` key it finds done)
and executors (by default one worker process per usable CPU, one thread each). Every student also
runs the two controls (``ce``: fine-tuning on the labels; ``self``: KL+DP toward the original alone)
with the same data, budget and seed, and every Δ carries its McNemar p-value, so a reader can tell
what the teacher added. With several seeds the tables pool them per pair (mean ± std; the McNemar
test on the counts summed over seeds: :func:`ktransfer.results.pool_seeds`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .controls import CONTROLS
from .engine import check_device
from .data import fashion_mnist
from .errors import ConfigError, KTransferError
from .methods import create_method, transfer_method_names
from .models.base import Model
from .models.store import DEFAULT_ZOO
from . import pretrain
from .output import output_console
from .results import summarize, summarize_controls
from .study import Study, StudyConfig, compare_methods, load_records
from .study.config import EXECUTORS
from .study.executors import usable_cpus, worker_pool
from . import tables

PROFILES = {
    # The full profile: every ordered pair of the six zoo models.
    "full": {"students": list(DEFAULT_ZOO), "teachers": list(DEFAULT_ZOO), "epochs": 3},
    # The quick profile: three students of three families, two epochs.
    "quick": {"students": ["cnn", "vit", "mixer"], "teachers": list(DEFAULT_ZOO), "epochs": 2},
    # The gain profile: every pair, with the budget at which KL+DP moved the converged students past
    # both controls on the validation split (30 epochs at the demo's constant lr; docs/demo.md): ten
    # times as long as full.
    "gain": {"students": list(DEFAULT_ZOO), "teachers": list(DEFAULT_ZOO), "epochs": 30},
}
# The demo's defaults, in one place (set from measurements: docs/demo.md).
DEFAULT_METHODS = ["kl", "kl_dp"]
DEFAULT_SEEDS = [0]
# SGD learning rate of every demo transfer and control, chosen on the validation split (the 10k training
# images the zoo never saw) over a few held-out pairs, never on the test set: see docs/demo.md.
DEMO_LR = 3e-3
DEFAULT_BATCH_SIZE = 128
# Where the runs execute: worker processes of this machine, as many as it has usable CPUs, one thread each.
DEFAULT_EXECUTOR = "processes"
DEMO_CPUS_PER_RUN = 1
# The demo's tables read each run's last epoch only: the evaluation set is scored after it alone (a sixth of
# a full-profile run's time was scoring epochs nobody reads; eval_every in docs/transfer.md).
DEMO_EVAL_EVERY = 0
# Every other method of a demo is also compared with this one, head to head (ktransfer.study.compare_methods).
REFERENCE_METHOD = "kl_dp"
STUDY_NAME = "demo"


@dataclass
class DemoOptions:
    profile: str = "full"
    out: Path = Path("ktransfer-demo")
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: int | None = None
    lr: float | None = None  # None: the profile's, else DEMO_LR
    schedule: str | None = None  # None: the profile's, else constant
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    setting: str = "paper"  # paper: transfer on data the zoo trained on; new-data: on the 10k images it never saw
    controls: bool = True
    augment: str = "none"
    students: list[str] | None = None
    teachers: list[str] | None = None
    data_dir: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "cpu"
    guard: bool = False  # transfers and controls return their best epoch on validation data (docs/guard.md)
    executor: str = DEFAULT_EXECUTOR  # local, processes or ray (the study's executors, docs/scale.md)

    def resolve(self) -> "DemoOptions":
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; choose one of: {', '.join(PROFILES)}")
        profile = PROFILES[self.profile]
        self.students = self.students or list(profile["students"])
        self.teachers = self.teachers or list(profile["teachers"])
        self.epochs = self.epochs or profile["epochs"]
        self.lr = self.lr if self.lr is not None else profile.get("lr", DEMO_LR)
        self.schedule = self.schedule or profile.get("schedule", "constant")
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
        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.executor!r}; choose one of: {', '.join(EXECUTORS)}")
        check_device(self.device)
        return self

    def study_config(self) -> StudyConfig:
        """The study these options describe: the profile's preset with every option applied."""
        self.resolve()
        data = {"source": "fashion-mnist", "setting": self.setting, **({"dir": str(self.data_dir)} if self.data_dir is not None else {})}
        return StudyConfig.from_dict({
            "name": STUDY_NAME, "students": [f"zoo:{n}" for n in self.students], "teachers": [f"zoo:{n}" for n in self.teachers],
            "methods": list(self.methods), "seeds": list(self.seeds), "epochs": self.epochs, "lr": self.lr, "schedule": self.schedule, "batch_size": self.batch_size,
            "data": data, "augment": self.augment, "device": self.device, "guard": self.guard, "controls": list(CONTROLS) if self.controls else [],
            "executor": self.executor, "cpus_per_run": DEMO_CPUS_PER_RUN, "eval_every": DEMO_EVAL_EVERY,
        }, source="demo options")


def load_zoo(names: list[str], data_dir, console: Console, executor: str = "local") -> dict[str, Model]:
    """The named zoo models, trained now (a progress bar each) or reloaded from the cache. With the processes
    executor the missing models train at once in worker processes, one per CPU with one thread each."""
    with _progress(console) as progress:
        tasks = {name: progress.add_task(f"zoo: {name}", total=None) for name in names}

        def on_step(name: str, step: int, total: int) -> None:
            progress.update(tasks[name], completed=step, total=total)

        def on_ready(name: str) -> None:
            progress.update(tasks[name], completed=1, total=1, description=f"zoo: {name} ready")
            if not console.is_terminal:  # no live bar in a log: one line per model instead
                console.print(f"zoo: {name} ready", markup=False, highlight=False)

        missing = [name for name in names if not pretrain.is_cached(name, data_dir)]
        if executor != "processes" or usable_cpus() < 2 or len(missing) < 2:
            return pretrain.load_zoo(names, data_dir, on_step=on_step, on_ready=on_ready)
        pool = worker_pool(min(usable_cpus(), len(missing)), threads=1)
        try:
            return pretrain.load_zoo(names, data_dir, pool, on_step=on_step, on_ready=on_ready)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_demo(options: DemoOptions, console: Console | None = None) -> dict:
    console = console or output_console()
    config = options.study_config()
    started = time.perf_counter()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = fashion_mnist.load(options.data_dir)
    transfer_set = splits.transfer_set(options.setting)
    console.print(
        f"[bold]Fashion-MNIST[/]: pretraining pool {len(splits.pool):,}, transfer set {len(transfer_set):,} ({options.setting} setting), "
        f"evaluation set {len(splits.eval):,} images"
    )
    # The zoo is trained here, once, before any run: the study's runner and its worker processes reload it from the cache.
    load_zoo(list(dict.fromkeys([*options.students, *options.teachers])), options.data_dir, console, options.executor)
    zoo_seconds = time.perf_counter() - started

    zoo_rows: list[dict] = []
    transfer_started = time.perf_counter()
    with _progress(console, transient=True) as progress:
        overall = progress.add_task("runs", total=None)

        def log(line: str) -> None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

        def on_analysis(analysis, rows: list[dict]) -> None:
            zoo_rows.extend({**row, "name": _short(row["name"])} for row in rows)
            (out / "zoo.json").write_text(json.dumps(zoo_rows, indent=2))  # the demo names models as the zoo does (cnn)
            progress.console.print(tables.zoo_table(zoo_rows, analysis.n_eval))
            progress.console.print(tables.flip_matrix_table([_short(m) for m in analysis.models], analysis.positive_flips, analysis.n_eval))

        def on_run(run, record: dict | None, error: str | None, finished: int, total: int) -> None:
            progress.update(overall, completed=finished, total=total, description=f"runs ({options.executor})")
            if record is not None:
                progress.console.print(f"[{finished}/{total}] " + _run_line(record), markup=False, highlight=False)

        study = Study(config, out)
        status = study.run(log=log, on_run=on_run, on_analysis=on_analysis)
    transfer_seconds = time.perf_counter() - transfer_started
    records = load_records(out)  # the finished runs of this plan, each compared with its controls

    n_eval = len(splits.eval)
    pooled = len(options.seeds) > 1
    console.print(tables.pairs_table(records, n_eval, pool=pooled))
    control_summary = summarize_controls(records)
    if control_summary:
        console.print(tables.controls_table(control_summary, n_eval))
    summary = summarize(records)
    console.print(tables.summary_table(summary, n_eval, with_controls=bool(control_summary)))
    head_to_head = _head_to_head(out, list(summary), console)
    failed = status["phases"]["study"]["failed"]
    if failed:
        console.print(f"[yellow]{failed} run(s) failed[/]; see them with: ktransfer study {out} --status (rerun the demo with the same options to retry them after a fix)")
    timing = {"zoo_seconds": zoo_seconds, "transfer_seconds": transfer_seconds, "total_seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps({"options": _jsonable(options), "study": config.to_dict(), "methods": summary, "controls": control_summary, "head_to_head": head_to_head, "timing": timing}, indent=2, default=str))
    console.print(f"zoo {zoo_seconds:.0f}s, runs {transfer_seconds:.0f}s, total {timing['total_seconds']:.0f}s. Results: [bold]{out / 'results.jsonl'}[/]")
    write_report(out, console)
    return {"records": records, "summary": summary, "controls": control_summary, "head_to_head": head_to_head, "zoo": zoo_rows, "timing": timing, "out": out, "status": status}


def _head_to_head(out: Path, methods: list[str], console: Console) -> dict[str, dict]:
    """Each method against REFERENCE_METHOD on the pairs and seeds both ran, printed a line each."""
    if REFERENCE_METHOD not in methods:
        return {}
    results = {}
    for method in methods:
        if method == REFERENCE_METHOD:
            continue
        try:
            results[method] = compare_methods(out, method, REFERENCE_METHOD)
        except KTransferError as exc:  # a failed run or a lost prediction file costs this line only
            console.print(f"[yellow]{method} against {REFERENCE_METHOD}: {exc}[/]")
            continue
        console.print(tables.head_to_head_line(results[method]), markup=False, highlight=False)
    return results


def _short(spec) -> str:
    return str(spec).removeprefix("zoo:")


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


def _progress(console: Console, transient: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=transient,
    )
