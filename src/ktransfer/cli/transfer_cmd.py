from __future__ import annotations

import json
from pathlib import Path

import click

from . import main
from .options import data_dir_option, parse_params


@main.command("transfer")
@click.option("--student", required=True, help="Student model spec, e.g. zoo:cnn.")
@click.option("--teacher", required=True, help="Teacher model spec, e.g. zoo:mlp.")
@click.option("--method", default="kl_dp", show_default=True, help="Transfer method (see `ktransfer methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A hyperparameter of the method; repeat for several.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="SGD learning rate (default: the method's paper default).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--targets", type=click.Choice(["cached", "online"]), default="cached", show_default=True, help="cached: teacher outputs computed once over the transfer set; online: a teacher forward pass per batch.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for results.jsonl (appended) and the trained student (safetensors).")
@data_dir_option
def transfer_command(student, teacher, method, params, epochs, lr, batch_size, seed, targets, out, data_dir):
    """Transfer knowledge from one teacher into one student and evaluate it.

    Example: ktransfer transfer --student zoo:cnn --teacher zoo:mlp --method kl_dp --epochs 3 --lr 1e-3 --out runs/cnn-mlp
    """
    from ..api import transfer
    from ..data import fashion_mnist
    from ..methods import create_method
    from ..models import load_model
    from ..predictions import PredictionCache
    from ..results import append_record

    method_obj = create_method(method, **parse_params(params))  # bad names and values fail before any work
    splits = fashion_mnist.load(data_dir)
    student_model = load_model(student, data_dir=data_dir)
    teacher_model = load_model(teacher, data_dir=data_dir)
    click.echo(f"{method}: {teacher} → {student}, {epochs} epochs on {len(splits.transfer):,} images")

    def on_epoch(record):
        click.echo(f"  epoch {record['epoch']}: acc {record['acc']:.2f}  Δ {record['delta']:+.2f}  gain {record['knowledge_gain']:.2f}  loss {record['knowledge_loss']:.2f}  ({record['seconds']:.1f}s)")

    result = transfer(
        student_model, teacher_model, splits.transfer, splits.eval, method=method_obj, epochs=epochs, lr=lr,
        batch_size=batch_size, seed=seed, targets=targets, cache=PredictionCache(), on_epoch=on_epoch,
    )
    out.mkdir(parents=True, exist_ok=True)
    append_record(out / "results.jsonl", result.metrics)
    name = f"{student}-from-{teacher}-{method}".replace(":", "_").replace("/", "_")
    weights = result.save_student(out / f"{name}.safetensors")
    m = result.metrics
    click.echo(json.dumps({k: m[k] for k in ("acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss")}))
    click.echo(f"student saved to {weights}; record appended to {out / 'results.jsonl'}")
