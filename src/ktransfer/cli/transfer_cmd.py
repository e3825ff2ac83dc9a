from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..extras import TRACKERS
from .group import main
from .data_options import data_options, echo_preprocessing, guard_val_spec, load_cli_data, load_cli_validation
from .options import data_dir_option, parse_params, pop_settings, settings_from_options, settings_options


@main.command("transfer")
@click.option("--student", required=True, help="Student model spec: zoo:cnn, timm:NAME[?pretrained=false&file=W], torchvision:NAME, package.module:factory, or a checkpoint path.")
@click.option("--teacher", required=True, multiple=True, help="Teacher model spec, e.g. zoo:mlp. Repeat it, with --strategy, to transfer from several teachers.")
@click.option("--strategy", type=click.Choice(["parallel", "sequential", "soup"]), default=None, help="How to use several teachers. parallel: one run, each sample learns from the most confident of the original student and the teachers (needs kl_dp); sequential: one stage of --epochs per teacher, fresh optimiser each, the stage's start as the retain target; soup: one transfer per teacher, then the students' weights averaged.")
@click.option("--order", type=click.Choice(["ascending", "descending", "given"]), default=None, help="sequential: teachers by accuracy on the evaluation data, weakest first (ascending, the default), strongest first, or as given.")
@click.option("--recalibrate-bn", is_flag=True, help="soup: recompute batch-norm statistics on the transfer data after averaging.")
@click.option("--method", default="kl_dp", show_default=True, help="Transfer method (see `ktransfer methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A hyperparameter of the method; repeat for several.")
@click.option("--controls/--no-controls", default=False, show_default=True, help="Also run the ce (labels only) and self (KL+DP toward the original only) controls with the same data, budget and seed, record them, and compare the transfer with them (delta_vs_control, delta_vs_self and their McNemar p-values). One teacher only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for results.jsonl (appended), the trained student (safetensors) and the checkpoints of a run (OUT/checkpoints).")
@click.option("--save-format", type=click.Choice(["native", "ktransfer"]), default="native", show_default=True, help="How the trained student is written. native: where its library loads it in one line: an hf: student as a save_pretrained folder, a timm or torchvision student as a safetensors state dict in the library's keys (timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))); ktransfer: a safetensors checkpoint in ktransfer's keys. Both record the architecture, so --student PATH reloads the student. See docs/transfer.md.")
@click.option("--log", "loggers", multiple=True, type=click.Choice(TRACKERS), help="Send the run (and its controls) to an experiment tracker; repeat for several. tensorboard: event files in OUT/tensorboard; mlflow: MLFLOW_TRACKING_URI's server, else a file store in OUT/mlruns; wandb: online if logged in, else offline into OUT/wandb; trackio: its local database. Each is an extra (pip install 'ktransfer[NAME]'); see docs/tracking.md.")
@click.option("--val-data", default=None, metavar="SPEC", help="--guard: the validation data to score on, as --eval-data (default: Fashion-MNIST's validation split for the embedded data, else a held-out share of the transfer data).")
@settings_options(exclude=("checkpoint_dir",))
@data_dir_option
@data_options
def transfer_command(student, teacher, method, params, controls, out, data_dir, strategy, order, recalibrate_bn, save_format, loggers, val_data, **options):
    """Transfer knowledge from one teacher (or several, with --strategy) into one student and evaluate it.

    Example: ktransfer transfer --student zoo:cnn --teacher zoo:mlp --method kl_dp --epochs 3 --lr 1e-3 --out runs/cnn-mlp

    Several teachers: ktransfer transfer --student zoo:vit --teacher zoo:mlp --teacher zoo:cnn --teacher zoo:resnet
    --strategy sequential --lr 1e-3 --out runs/vit-3 (see docs/multi-teacher.md)

    Own models and data: ktransfer transfer --student timm:resnet18 --teacher timm:vit_small_patch16_224
    --data folder:imagenet --subset 0.1 --out runs/r18-vits (see docs/models-and-data.md)

    A single transfer checkpoints into OUT/checkpoints (every epoch and every 10 minutes by
    default); run the same command again to resume it (see docs/checkpoints.md).

    On several GPUs or processes: torchrun --nproc-per-node 4 -m ktransfer transfer ... --device cuda
    (one transfer, the student under DistributedDataParallel; rank 0 prints and writes; see docs/scale.md).
    """
    from ..api import transfer
    from ..checkpoints import RunFinishedError
    from ..distributed import is_main_process, launched_by_torchrun
    from ..errors import ConfigError
    from ..engine import Interrupted, check_device
    from ..methods import create_method
    from ..models import load_model
    from ..predictions import PredictionCache
    from ..results import append_record
    from ..targets import resolve_targets

    method_obj = create_method(method, **parse_params(params))  # bad names and values fail before any work
    given = pop_settings(options)
    data = options  # what is left: the data options
    if given.get("amp_frozen") and not given.get("amp"):
        raise ConfigError("--amp-frozen runs the frozen models under --amp's autocast: add --amp")
    if not given.get("guard") and (val_data is not None or given.get("guard_holdout") is not None):
        raise ConfigError("--val-data and --guard-holdout are the guard's: add --guard")
    resolve_targets(given.get("targets"), given.get("augment") or "none", where="--targets")
    # A single transfer checkpoints into OUT/checkpoints, and saves its student and record before the run is marked finished.
    checkpointed = strategy is None
    if not checkpointed and any(given.get(k) for k in ("checkpoint_every", "checkpoint_minutes", "keep_checkpoints")):
        raise ConfigError("--checkpoint-every, --checkpoint-minutes and --keep-checkpoints apply to a single transfer; the command does not checkpoint --strategy runs (the Python API's transfer_multi does for strategy parallel)")
    settings = settings_from_options(given, **({"checkpoint_dir": str(out / "checkpoints")} if checkpointed else {}))
    check_device(settings.device)
    teachers, teacher = list(teacher), teacher[0]
    _check_strategy_options(teachers, strategy, order, recalibrate_bn, method_obj)
    if loggers and strategy is not None:
        raise ConfigError("--log sends a single transfer (and its controls) to a tracker; run --strategy without it, or its transfers one by one with --log")
    if controls and strategy is not None:
        raise ConfigError("--controls compares a single-teacher transfer with its controls; run the controls with one --teacher, or use 'ktransfer study'")
    if launched_by_torchrun() and (strategy is not None or controls):
        raise ConfigError("under torchrun, ktransfer transfer runs one transfer; run --strategy and --controls in one process, or their transfers one by one")
    # Under torchrun every process runs this command; rank 0 alone prints and writes.
    echo = click.echo if is_main_process() else (lambda *args, **kwargs: None)
    val_spec = guard_val_spec(val_data, data["data_spec"], data["transfer_data"], data["eval_data"]) if settings.guard else None
    # Validation data that shares samples with the evaluation data, by any spelling, is refused by the transfer itself (transfer_checks.guard_data).
    if val_spec is not None and given.get("guard_holdout") is not None:
        raise ConfigError(f"--guard-holdout holds out transfer data, but the guard scores on {val_spec}; leave out one of them")
    student_model = load_model(student, data_dir=data_dir)
    teacher_model = load_model(teacher, data_dir=data_dir)
    teacher_models = [teacher_model, *(load_model(spec, data_dir=data_dir) for spec in teachers[1:])]
    transfer_set, eval_set = load_cli_data([student_model, *teacher_models], out, data_dir, **data)
    val_set = load_cli_validation(val_spec, [student_model, *teacher_models], transfer_set, data_dir, **data) if val_spec is not None else None
    if strategy is not None:
        return _transfer_from_several(student_model, teacher_models, method_obj, strategy, order, recalibrate_bn, transfer_set, eval_set, val_set, out, settings, save_format)
    augmented = ", augmented" if settings.augment != "none" else ""
    echo(f"{method}: {teacher} → {student}, {settings.epochs} epochs on {len(transfer_set):,} images ({transfer_set.name}{augmented}), evaluated on {len(eval_set):,}")
    if is_main_process():
        echo_preprocessing([student_model, teacher_model])

    def on_epoch(record):
        guarded = f"  guard acc {record['guard_acc']:.2f}" if "guard_acc" in record else ""
        click.echo(f"  epoch {record['epoch']}: {_scores(record)}{guarded}  ({record['seconds']:.1f}s)")

    # The learning rate is fixed now, so that the controls train at the transfer's own.
    settings = settings.replace(lr=settings.lr if settings.lr is not None else method_obj.default_lr)
    # Passed to the controls too, so they are guarded (and tracked) alike.
    shared = dict(cache=PredictionCache(), val_data=val_set, **(dict(loggers=list(loggers), tracking_dir=out) if loggers else {}))
    saved = {}

    def save_outputs(result):  # before the run is marked finished, so a crash cannot lose them
        records = [result.metrics]
        if controls:  # the controls run now, so a rerun after a crash here finds the transfer finished only with them
            records = [*_run_controls(student_model, transfer_set, eval_set, result, settings.replace(checkpoint_dir=None, checkpoint_every=None, keep_checkpoints=False), shared), result.metrics]
        out.mkdir(parents=True, exist_ok=True)
        for record in records:
            append_record(out / "results.jsonl", record)
        saved["weights"] = result.save_student(out / f"{file_name(f'{student}-from-{teacher}-{method}')}.safetensors", save_format)
        saved["records"] = len(records)

    def log(line):
        click.echo(line, err=line.startswith("Warning"))

    try:
        result = transfer(student_model, teacher_model, transfer_set, eval_set, method_obj, settings, on_epoch=on_epoch, on_result=save_outputs, log=log, **shared)
    except RunFinishedError as finished:
        echo(f"Nothing to do: {finished}")
        return
    except Interrupted as stop:
        click.echo(f"Interrupted at {stop.where}; checkpoint written to {stop.path}. To resume, run the same command again.", err=True)
        sys.exit(130)  # as a shell reports a program stopped by Ctrl-C
    if not is_main_process():
        return
    m = result.metrics
    keys = ("acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss", "p_value", "delta_vs_control", "p_value_vs_control", "delta_vs_self", "p_value_vs_self")
    if settings.guard:
        kept = "the original student" if m["guard_epoch"] == 0 else f"epoch {m['guard_epoch']}"
        echo(f"guard ({m['guard_source']}, {m['guard_size']:,} images): kept {kept}; accuracy there {m['guard_acc_before']:.2f} → {m['guard_acc_after']:.2f}; the last epoch's Δ was {m['last_epoch']['delta']:+.2f}")
        keys = (*keys, "guard_epoch", "guard_source")
    echo(json.dumps({k: m[k] for k in keys if k in m}))
    echo(f"student saved to {saved['weights']}; {saved['records']} record(s) appended to {out / 'results.jsonl'}")


def _run_controls(student_model, transfer_set, eval_set, result, settings, shared: dict) -> list[dict]:
    """The ce and self controls of a transfer, with its settings; the transfer's record gains its comparisons with them."""
    from ..controls import CONTROLS, attach_controls, run_control

    records, predictions = [], {id(result.metrics): result.predictions}
    for kind in CONTROLS:
        control = run_control(kind, student_model, transfer_set, eval_set, settings, **shared)
        click.echo(f"  {kind} control (no teacher): Δ {control.metrics['delta']:+.2f} (p {control.metrics['p_value']:.2g})")
        records.append(control.metrics)
        predictions[id(control.metrics)] = control.predictions
    attach_controls([*records, result.metrics], predictions, eval_set.labels)
    m = result.metrics
    click.echo(
        f"  beyond the controls: vs ce {m['delta_vs_control']:+.2f} (p {m['p_value_vs_control']:.2g}), "
        f"vs self {m['delta_vs_self']:+.2f} (p {m['p_value_vs_self']:.2g})"
    )
    return records


def _check_strategy_options(teachers, strategy, order, recalibrate_bn, method) -> None:
    """Option mistakes fail here, before any model is loaded."""
    from ..errors import ConfigError
    from ..multi import check_parallel_method

    if strategy is None and len(teachers) > 1:
        raise ConfigError(f"{len(teachers)} teachers given: say how to combine them with --strategy parallel, sequential or soup")
    if order is not None and strategy != "sequential":
        raise ConfigError("--order applies to --strategy sequential only")
    if recalibrate_bn and strategy != "soup":
        raise ConfigError("--recalibrate-bn applies to --strategy soup only")
    if strategy == "parallel":
        check_parallel_method(method, len(teachers))


def _transfer_from_several(student_model, teacher_models, method, strategy, order, recalibrate_bn, transfer_set, eval_set, val_set, out, settings, save_format="native") -> None:
    from ..checkpoints import RunFinishedError
    from ..multi import transfer_multi
    from ..predictions import PredictionCache
    from ..results import append_record

    student, teachers = student_model.spec or student_model.name, [t.spec or t.name for t in teacher_models]
    budget = "" if strategy == "parallel" else " per teacher"
    click.echo(f"{method.name}, {strategy}: {' + '.join(teachers)} → {student}, {settings.epochs} epochs{budget} on {len(transfer_set):,} images, evaluated on {len(eval_set):,}")

    def on_epoch(record):
        where = ""
        if "stage" in record:
            where = f"stage {record['stage']} ({record['stage_teacher']}) "
        elif "ingredient" in record:
            where = f"ingredient {record['ingredient']} ({record['ingredient_teacher']}) "
        line = f"  {where}epoch {record['epoch']}: {_scores(record)}"
        if "delta_vs_first" in record:
            line += f"  Δ since the first student {record['delta_vs_first']:+.2f}"
        shares = [record[f"share_{k}"] for k in range(len(teacher_models) + 1) if f"share_{k}" in record]
        if len(shares) > 2:
            line += "  routed: " + " / ".join(f"{share:.0%}" for share in shares)
        click.echo(f"{line}  ({record['seconds']:.1f}s)")

    try:
        result = transfer_multi(
            student_model, teacher_models, transfer_set, eval_set, method, settings, strategy=strategy, order=order or "ascending",
            recalibrate_bn=recalibrate_bn, val_data=val_set, cache=PredictionCache(), on_epoch=on_epoch,
        )
    except RunFinishedError as finished:
        click.echo(f"Nothing to do: {finished}")
        return
    out.mkdir(parents=True, exist_ok=True)
    append_record(out / "results.jsonl", result.metrics)
    joined = "+".join(teachers)
    weights = result.save_student(out / f"{file_name(f'{student}-from-{joined}-{strategy}-{method.name}')}.safetensors", save_format)
    m = result.metrics
    summary = {k: m[k] for k in ("acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss", "p_value")}
    if strategy == "parallel":
        summary["routed_shares"] = m["routed_shares"]
    elif strategy == "sequential":
        summary["stage_deltas"] = {stage["teacher"]: stage["delta"] for stage in m["stages"]}
    else:
        summary["ingredient_deltas"] = {ingredient["teacher"]: ingredient["delta"] for ingredient in m["ingredients"]}
        summary["recalibrated_bn_layers"] = m["recalibrated_bn_layers"]
    click.echo(json.dumps(summary))
    click.echo(f"student saved to {weights}; record appended to {out / 'results.jsonl'}")


def file_name(text: str, limit: int = 200) -> str:
    """A model spec turned into a file name: no path separators or URL-query characters, and short enough for
    any file system (a longer one keeps its start and ends in a hash of the whole)."""
    import hashlib

    whole = text
    for character, replacement in ((":", "_"), ("/", "_"), ("?", "_"), ("&", "_"), ("=", "-")):
        text = text.replace(character, replacement)
    if len(text.encode()) > limit:
        text = text.encode()[: limit - 17].decode(errors="ignore") + "-" + hashlib.blake2b(whole.encode(), digest_size=8).hexdigest()
    return text


def _scores(record: dict) -> str:
    """An epoch's numbers on the evaluation data, or its training loss where --eval-every left it unscored."""
    if "acc" not in record:
        return f"train loss {record['train_loss']:.4f} (not scored: --eval-every)"
    return f"acc {record['acc']:.2f}  Δ {record['delta']:+.2f} (p {record['p_value']:.2g})  gain {record['knowledge_gain']:.2f}  loss {record['knowledge_loss']:.2f}"
