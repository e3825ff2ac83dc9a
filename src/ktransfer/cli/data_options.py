"""The data options of the commands that train (transfer, adapt): which data, which subset, how to read it."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError, ModelError

SUBSET_INDEX_FILE = "transfer-subset.json"


def data_options(command):
    """Add --data, --transfer-data/--eval-data, a Hugging Face dataset's columns, the subset options and the folder-reading options."""
    options = [
        click.option("--data", "data_spec", default=None, metavar="SPEC", help="fashion-mnist (the default); folder:PATH, where PATH holds train/ (transfer) and val/ (evaluation), one subfolder per class; or a Hugging Face dataset with a train and a validation split: hf-disk:PATH (saved with save_to_disk) or hf-imagefolder:PATH (read by datasets' imagefolder loader)."),
        click.option("--transfer-data", default=None, metavar="SPEC", help="Transfer (training) data on its own: folder:PATH of class subfolders, hf-disk:PATH or hf-imagefolder:PATH (a Dataset, or a DatasetDict's train split), or fashion-mnist[:transfer|validation|test|pool] (transfer: a stratified 20% of the zoo's pool; validation: the 10k training images the zoo never saw)."),
        click.option("--eval-data", default=None, metavar="SPEC", help="Evaluation data on its own, as --transfer-data; its classes must be among the transfer data's."),
        click.option("--image-column", default=None, metavar="NAME", help="hf-disk:/hf-imagefolder: data: the column of images (default: the one datasets.Image column)."),
        click.option("--label-column", default=None, metavar="NAME", help="hf-disk:/hf-imagefolder: data: the column of labels (default: the one ClassLabel column, whose names are the class names; an integer column gives the classes 0..K-1)."),
        click.option("--subset", default=None, metavar="FRACTION|INDEX.json", help=f"Train on a stratified subset of the transfer data: a fraction per class (the paper: 0.1), or a saved index to reuse. The index is saved as {SUBSET_INDEX_FILE} in --out."),
        click.option("--subset-per-class", type=click.IntRange(min=1), default=None, metavar="N", help="Stratified subset with N images of each class (all of a class that has fewer)."),
        click.option("--subset-seed", type=int, default=0, show_default=True, help="Seed of the subset draw."),
        click.option("--image-size", type=click.IntRange(min=8), default=None, help="Side of the square raw images a folder is decoded to (shorter side resized, center crop); each model then resizes its own way. Default: the largest any model needs."),
        click.option("--workers", type=click.IntRange(min=0), default=None, help="Processes that decode image files (default: up to 8, one per core)."),
        click.option("--skip-corrupt", is_flag=True, help="Leave out (and list) images that cannot be read, instead of stopping with their names."),
        click.option("--stream/--in-memory", "stream", default=None, help="Decode folder images per batch from disk, or hold them all in memory. Default: in memory when they take at most 4 GiB."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_cli_data(models, out: Path | None, data_dir=None, *, data_spec=None, transfer_data=None, eval_data=None, image_column=None, label_column=None, subset=None, subset_per_class=None, subset_seed=0, image_size=None, workers=None, skip_corrupt=False, stream=None, subset_role="transfer", index_file=SUBSET_INDEX_FILE):
    """Transfer and evaluation data for ``models``: the raw image size and channels follow their preprocessing."""
    from ..data.sources import choose_subset, materialize, open_sources, raw_channels, raw_image_size

    given = [spec for spec in (transfer_data, eval_data) if spec is not None]
    if data_spec is None and len(given) < 2:
        if any(not spec.startswith("fashion-mnist") for spec in given):
            raise ConfigError("give --transfer-data and --eval-data together (or --data folder:PATH with train/ and val/ inside, or --data hf-disk:PATH with a train and a validation split)")
        data_spec = "fashion-mnist"
    transfer, evaluation = open_sources(data_spec, transfer_data, eval_data, data_dir, image_column=image_column, label_column=label_column)
    index_path = out / index_file if out is not None else None
    transfer, record = choose_subset(transfer, subset, subset_per_class, subset_seed, index_path)
    if record is not None:
        click.echo(f"{subset_role} subset: {record['n_subset']:,} of {record['n_total']:,} images; index saved to {index_path}")
    preprocesses = [model.preprocess for model in models]
    size, channels = raw_image_size(preprocesses, image_size), raw_channels(preprocesses)

    def log(message):
        click.echo(f"Warning: {message}", err=True)

    options = dict(workers=workers, skip_corrupt=skip_corrupt, in_memory=None if stream is None else not stream, log=log)
    transfer_set, eval_set = materialize(transfer, size, channels, **options), materialize(evaluation, size, channels, **options)
    for model in models:
        names = model.class_names
        if names and list(names) != list(transfer_set.class_names):
            raise ModelError(
                f"{model.spec or model.name} was adapted to the classes {_short(names)}, but the data has {_short(transfer_set.class_names)}; "
                f"adapt it to this data with 'ktransfer adapt'"
            )
    return transfer_set, eval_set


def guard_val_spec(val_data: str | None, data_spec: str | None, transfer_data: str | None, eval_data: str | None) -> str | None:
    """The guard's validation data: --val-data, else Fashion-MNIST's validation split when the data is the
    embedded Fashion-MNIST and does not train on that split; None: a share of the transfer data is held out."""
    if val_data is not None:
        return val_data
    specs = [spec for spec in (data_spec, transfer_data, eval_data) if spec is not None]
    if all(spec.startswith("fashion-mnist") for spec in specs) and "fashion-mnist:validation" not in (transfer_data, eval_data):
        return "fashion-mnist:validation"
    return None


def load_cli_validation(spec: str, models, transfer_set, data_dir=None, *, image_size=None, workers=None, skip_corrupt=False, stream=None, image_column=None, label_column=None, **_):
    """The guard's validation data from a spec, read like the transfer data and in its label space."""
    from ..data.sources import materialize, open_split, raw_channels, raw_image_size

    source = open_split(spec, "eval", list(transfer_set.class_names), data_dir, image_column=image_column, label_column=label_column)
    if list(source.class_names) != list(transfer_set.class_names):
        raise ConfigError(f"--val-data {spec} has other classes than the transfer data; the guard's validation data must share its label space")
    preprocesses = [model.preprocess for model in models]

    def log(message):
        click.echo(f"Warning: {message}", err=True)

    return materialize(source, raw_image_size(preprocesses, image_size), raw_channels(preprocesses), workers=workers, skip_corrupt=skip_corrupt, in_memory=None if stream is None else not stream, log=log)


def _short(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f", ... ({len(names)} classes)" if len(names) > 4 else "")


def echo_preprocessing(models) -> None:
    """One line per model: how it sees the images (each model its own way)."""
    for model in models:
        p = model.preprocess
        size = f"{p.input_size[0]}x{p.input_size[1]}" if p.input_size else "as given"
        crop = f", crop {p.crop_pct:g}" if p.crop_pct else ""
        click.echo(f"  {model.spec or model.name}: input {size}{crop}, {p.interpolation}, mean {_numbers(p.mean)}, std {_numbers(p.std)}")


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"

