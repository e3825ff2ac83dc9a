"""The multi-teacher study of appendix Table 9 on the embedded zoo (``ktransfer demo --multi-teacher``).

For each student and method: the transfer delta of every single teacher (mean, min, max) beside
sequential, parallel and soup transfer from all the teachers together. The single-teacher runs
are the soup's ingredients. Computation lives in :func:`run_multi_teacher_demo`; the console only
shows what it does.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

from safetensors.torch import load_file

from rich.console import Console
from rich.table import Table

from . import tables
from .output import output_console
from .api import TransferResult, transfer
from .data import fashion_mnist
from .demo import DemoOptions, _jsonable, _progress, load_zoo
from .errors import ConfigError
from .methods import create_method
from .metrics import accuracy
from .multi import transfer_multi
from .weight_averaging import batch_norm_layers
from .predictions import PredictionCache
from .results import append_record, read_records

# Students of three families and three teachers of three others, as the paper took three and three.
MULTI_TEACHER_PROFILES = {
    "full": {"students": ["cnn", "resnet", "mixer"], "teachers": ["mlp", "convnext", "vit"]},
    "quick": {"students": ["cnn", "mixer"], "teachers": ["mlp", "convnext", "vit"]},
}
STRATEGY_COLUMNS = ("sequential", "parallel", "soup", "soup_bn")
STUDENTS_FOLDER = "multi-teacher-students"  # the single-teacher students, kept so a rerun can make its soups without retraining


def _run_key(record: dict) -> tuple:
    return (
        record["student"], record["teacher"], record.get("strategy"), record["method"], json.dumps(record["epochs"]), record["lr"],
        record["seed"], record.get("batch_size"), json.dumps(record["hparams"], sort_keys=True), bool(record.get("recalibrate_bn")),
        record.get("transfer_data"),
    )


def _weights_file(out: Path, record: dict) -> Path:
    name = f"{record['student']}-from-{record['teacher']}-{record['method']}-e{record['epochs']}-lr{record['lr']:g}-s{record['seed']}-b{record.get('batch_size')}-{record.get('transfer_data')}"
    hparams = "_".join(f"{k}={v}" for k, v in sorted(record["hparams"].items()))
    for character in ":/?&= ":
        name, hparams = name.replace(character, "_"), hparams.replace(character, "_")
    return out / STUDENTS_FOLDER / f"{name}-{hparams or 'default'}.safetensors"


def resolve_multi_teacher(options: DemoOptions) -> DemoOptions:
    if options.profile not in MULTI_TEACHER_PROFILES:
        raise ConfigError(f"unknown profile {options.profile!r}; choose one of: {', '.join(MULTI_TEACHER_PROFILES)}")
    profile = MULTI_TEACHER_PROFILES[options.profile]
    options.students = options.students or list(profile["students"])
    options.teachers = options.teachers or list(profile["teachers"])
    options.resolve()
    if options.schedule != "constant":
        raise ConfigError("--schedule applies to the single-teacher demo; the multi-teacher table trains at a constant learning rate")
    if len(options.teachers) < 2:
        raise ConfigError(f"the multi-teacher table needs at least two teachers (the paper uses three); got {', '.join(options.teachers)}")
    overlap = sorted(set(options.students) & set(options.teachers))
    if overlap:
        raise ConfigError(f"{', '.join(overlap)} cannot be both student and teacher in the multi-teacher table; choose --students and --teachers apart")
    return options


def run_multi_teacher_demo(options: DemoOptions, console: Console | None = None) -> dict:
    console = console or output_console()
    resolve_multi_teacher(options)
    started = time.perf_counter()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = fashion_mnist.load(options.data_dir)
    transfer_set = splits.transfer_set(options.setting)
    console.print(f"[bold]Fashion-MNIST[/]: transfer set {len(transfer_set):,} ({options.setting} setting), evaluation set {len(splits.eval):,} images")

    names = list(dict.fromkeys([*options.students, *options.teachers]))
    models = load_zoo(names, options.data_dir, console)
    cache = PredictionCache()
    zoo_rows = [
        {"name": name, "family": models[name].family, "parameters": models[name].num_parameters, "accuracy": accuracy(splits.eval.labels, cache.predictions(models[name], splits.eval))}
        for name in names
    ]
    console.print(tables.zoo_table(zoo_rows, len(splits.eval)))

    settings = dict(epochs=options.epochs, lr=options.lr, seed=options.seeds[0], batch_size=options.batch_size, cache=cache, device=options.device, augment=options.augment)
    teachers = [models[name] for name in options.teachers]
    results_path = out / "results.jsonl"
    previous = {_run_key(r): r for r in read_records(results_path) if "hparams" in r} if results_path.exists() else {}
    reused = 0
    rows, records = [], []
    runs_per_pair = len(options.teachers) * 2 + 3  # singles, sequential stages, parallel, soups
    with _progress(console) as progress:
        overall = progress.add_task("multi-teacher", total=len(options.students) * len(options.methods) * runs_per_pair)
        for student_name in options.students:
            student = models[student_name]
            has_batch_norm = bool(batch_norm_layers(student.module))
            for method in options.methods:
                method_obj = create_method(method)
                row = {"student": student_name, "family": student.family, "parameters": student.num_parameters, "method": method}

                def take_finished(record: dict) -> dict:
                    nonlocal reused
                    records.append(record)
                    reused += 1
                    return record

                def keep(record: dict, label: str) -> None:
                    append_record(results_path, record)
                    records.append(record)
                    progress.console.print(f"  {method:<6} {label:<24} → {student_name:<8} Δ {record['delta']:+5.2f}  gain {record['knowledge_gain']:4.2f}  loss {record['knowledge_loss']:4.2f}  ({record['seconds']:.1f}s)")

                planned = dict(
                    student=student.spec, method=method, epochs=options.epochs, lr=options.lr, seed=options.seeds[0], batch_size=options.batch_size,
                    hparams=method_obj.describe(), transfer_data=transfer_set.name,
                )
                singles = []
                for teacher_name, teacher in zip(options.teachers, teachers):
                    progress.update(overall, description=f"{method}: {teacher_name} → {student_name}")
                    done = previous.get(_run_key({**planned, "teacher": teacher.spec}))
                    weights = _weights_file(out, {**planned, "teacher": teacher.spec})
                    # A finished run is reused only with its student, which the soup needs as an ingredient.
                    if done is not None and weights.is_file():
                        module = copy.deepcopy(student.module)
                        module.load_state_dict(load_file(weights))
                        result = TransferResult(module, take_finished(done), done.get("history", []), student.rebuilt(module.eval()))
                    else:
                        result = transfer(student, teacher, transfer_set, splits.eval, method=create_method(method), **settings)
                        result.save_student(weights)
                        keep(result.metrics, teacher_name)
                    singles.append(result)
                    progress.advance(overall)
                deltas = [r.metrics["delta"] for r in singles]
                row.update(
                    acc_before=singles[0].metrics["acc_before"],
                    single_deltas=dict(zip(options.teachers, deltas)),
                    single_mean=statistics.fmean(deltas), single_min=min(deltas), single_max=max(deltas),
                )

                several = {**planned, "teacher": "+".join(t.spec for t in teachers)}

                def run_strategy(strategy: str, label: str, **extra) -> dict:
                    done = previous.get(_run_key({**several, "strategy": strategy, "recalibrate_bn": extra.get("recalibrate_bn", False)}))
                    if done is not None:
                        return take_finished(done)
                    progress.update(overall, description=f"{method}: {label} → {student_name}")
                    result = transfer_multi(student, teachers, transfer_set, splits.eval, create_method(method), strategy=strategy, **settings, **extra)
                    keep(result.metrics, label)
                    return result.metrics

                sequential = run_strategy("sequential", "sequential")
                row["sequential"] = sequential["delta"]
                row["sequential_order"] = [name.removeprefix("zoo:") for name in sequential["stage_teachers"]]
                progress.advance(overall, len(teachers))

                row["parallel"] = None
                if method_obj.supports_multiple_teachers and getattr(method_obj.params, "routing", "confidence") == "confidence":
                    parallel = run_strategy("parallel", "parallel")
                    row["parallel"] = parallel["delta"]
                    row["parallel_shares"] = parallel["routed_shares"]
                progress.advance(overall)

                # The single-teacher students above are the soup's ingredients: no transfer is repeated.
                row["soup"] = run_strategy("soup", "soup", reuse=singles)["delta"]
                row["soup_bn"] = None
                if has_batch_norm:
                    row["soup_bn"] = run_strategy("soup", "soup, BN recomputed", reuse=singles, recalibrate_bn=True)["delta"]
                progress.advance(overall, 2)
                rows.append(row)

    n_eval = len(splits.eval)
    teacher_rows = [r for r in zoo_rows if r["name"] in options.teachers]
    if reused:
        console.print(f"reused {reused} finished runs from {results_path}")
    console.print(multi_teacher_table(rows, teacher_rows, n_eval, options.epochs))
    timing = {"total_seconds": time.perf_counter() - started}
    summary = {"options": _jsonable(options), "teachers": teacher_rows, "rows": rows, "n_eval": n_eval, "timing": timing}
    (out / "multi_teacher.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"total {timing['total_seconds']:.0f}s. Table: [bold]{out / 'multi_teacher.json'}[/]; every run's record in [bold]{results_path}[/]")
    return {"rows": rows, "records": records, "teachers": teacher_rows, "timing": timing, "out": out}


def multi_teacher_table(rows: list[dict], teachers: list[dict], n_eval: int, epochs: int) -> Table:
    """Appendix Table 9's layout: single-teacher Δ (mean, min, max) beside the multi-teacher strategies."""
    teacher_names = ", ".join(f"{t['name']} {t['accuracy']:.1f}%" for t in teachers)
    table = Table(title=f"Transfer from several teachers ({teacher_names}); Δ in points of accuracy on {n_eval:,} images, {epochs} epochs per teacher")
    columns = ("student", "acc", "# param", "method", "single mean", "single min", "single max", "sequential", "parallel", "soup", "soup, BN recomputed")
    for column in columns:
        table.add_column(column, justify="left" if column in ("student", "method") else "right")
    for row in rows:
        table.add_row(
            row["student"], tables._fmt(row["acc_before"]), f"{row['parameters']:,}", row["method"],
            *(tables._fmt(row[key], "+.2f") for key in ("single_mean", "single_min", "single_max", *STRATEGY_COLUMNS)),
        )
    table.caption = "sequential: weakest teacher first, a fresh optimiser per stage; parallel: per sample the most confident of the original student and the teachers (KL+DP only); soup: the single-teacher students averaged"
    return table
