from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .group import main
from .data_options import data_options, echo_preprocessing, load_cli_data
from .options import data_dir_option


@main.command("adapt")
@click.option("--model", "model_spec", required=True, help="Model to adapt: timm:NAME, torchvision:NAME, package.module:factory, zoo:NAME or a checkpoint path.")
@click.option("--full", is_flag=True, help="Fine-tune the whole network instead of only the classification layer (linear probe).")
@click.option("--new-head/--keep-head", default=None, help="Start from a fresh classification layer, or fine-tune the existing one. Default: fresh when the class count differs.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="SGD learning rate (default: 1e-2 for a linear probe, 1e-3 with --full).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the adapted checkpoint (safetensors) and its summary.")
@click.option("--name", default=None, help="File name of the checkpoint, without extension (default: from the model spec).")
@data_dir_option
@data_options
def adapt_command(model_spec, full, new_head, epochs, lr, batch_size, seed, out, name, data_dir, **data):
    """Fit a model's classification layer to a new dataset's classes, saved as a checkpoint.

    Trains on the transfer (training) data and reports accuracy on the evaluation data after each
    epoch. The checkpoint's path is a model spec for every command, e.g. --student PATH.

    Example: ktransfer adapt --model timm:resnet18 --data folder:flowers --out runs/adapted
    """
    from ..adapt import adapt
    from ..models import load_model

    model = load_model(model_spec, data_dir=data_dir)
    train_set, eval_set = load_cli_data([model], out, data_dir, subset_role="adapt", index_file="adapt-subset.json", **data)
    click.echo(f"adapting {model_spec} to {train_set.num_classes} classes of {train_set.name} ({len(train_set):,} images, {'full fine-tuning' if full else 'linear probe'})")
    echo_preprocessing([model])

    def on_epoch(record):
        click.echo(f"  epoch {record['epoch']}: loss {record['train_loss']:.4f}  acc {record['acc']:.2f} on {len(eval_set):,} ({record['seconds']:.1f}s)")

    result = adapt(model, train_set, eval_set, full=full, new_head=new_head, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch)
    stem = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model_spec.partition("?")[0]).stem if model_spec.endswith(".safetensors") else model_spec.partition("?")[0]).strip("_") + "-adapted"
    path = result.save(out / f"{stem}.safetensors")
    (out / f"{stem}.json").write_text(json.dumps({**result.metrics, "checkpoint": str(path), "history": result.history}, indent=1) + "\n")
    click.echo(f"adapted model saved to {path} (accuracy {result.metrics['acc']:.2f}); use it as a model spec, e.g. --student {path}")
