"""Data specs a user writes: ``fashion-mnist`` (embedded), ``folder:PATH`` (image folders) and Hugging Face datasets.

``--data fashion-mnist``          the transfer split (a stratified 20% of the zoo's pool, seen by the zoo) and the test set
``--data folder:PATH``            ``PATH/train`` for transfer, ``PATH/val`` (or ``validation``, ``test``) for evaluation
``--transfer-data folder:A``      one folder of class subfolders each, given separately
``--eval-data folder:B``
``--data hf-disk:PATH``           a ``save_to_disk`` DatasetDict: its ``train`` split for transfer, ``val``/``validation``/``test`` for evaluation
``--data hf-imagefolder:PATH``    the same from ``datasets``' imagefolder loader (data.hf_datasets)

Resolving a spec lists a folder's files (or a dataset's rows) without decoding them (:func:`open_data`),
so a subset can be drawn first and the raw image size chosen from the models (:func:`materialize`).
In Python a ``datasets.Dataset`` or ``DatasetDict`` object stands where a spec does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DataError
from . import hf_datasets
from .base import ImageData
from .folder import FolderImageData, ImageListing, apply_subset_index, load_folder, make_subset, save_subset_index, scan_folder

EVAL_FOLDER_NAMES = ("val", "validation", "test")
FASHION_MNIST_PARTS = ("transfer", "validation", "test", "pool")
DEFAULT_IMAGE_SIZE = 224

DataSource = ImageData | ImageListing  # what open_data gives: images in memory, or files (or dataset rows) not yet decoded


@dataclass
class DataSplits:
    transfer: ImageData | FolderImageData
    eval: ImageData | FolderImageData
    subset_index: dict | None = None


def _fashion_mnist(part: str, data_dir) -> ImageData:
    from . import fashion_mnist

    splits = fashion_mnist.load(data_dir)
    return {"transfer": splits.transfer, "validation": splits.validation, "test": splits.eval, "eval": splits.eval, "pool": splits.pool}[part]


def _folder_root(spec: str) -> Path:
    path = spec.partition(":")[2]
    if not path:
        raise ConfigError(f"data spec {spec!r} names no folder; write folder:PATH")
    return Path(path).expanduser()


def _check_scheme(spec) -> str:
    """The scheme of a spec (``hf`` for a ``datasets`` object in its place), or the error that lists them."""
    if hf_datasets.is_hf_dataset(spec):
        return "hf"
    if not isinstance(spec, str):
        raise ConfigError(f"a data spec is a string such as folder:PATH, or in Python a datasets.Dataset or DatasetDict; got {type(spec).__name__}")
    scheme = spec.partition(":")[0].strip().lower()
    if scheme in hf_datasets.SCHEMES:
        return "hf"
    if scheme not in ("fashion-mnist", "folder"):
        raise ConfigError(
            f"unknown data spec {spec!r}; use fashion-mnist, folder:PATH (a folder of class subfolders, or one with train/ and val/), "
            f"hf-disk:PATH (a Hugging Face dataset saved with save_to_disk) or hf-imagefolder:PATH (a folder read by datasets' imagefolder loader)"
        )
    return scheme


def open_data(spec, data_dir: str | os.PathLike | None = None, *, image_column: str | None = None, label_column: str | None = None) -> tuple[DataSource, DataSource]:
    """``(transfer, eval)`` for ``--data SPEC``: fashion-mnist, folder:PATH holding train/ and val/, or a Hugging
    Face DatasetDict with a train and a validation split (hf-disk:PATH, hf-imagefolder:PATH, or the object)."""
    scheme = _check_scheme(spec)
    if scheme == "fashion-mnist":
        return _fashion_mnist("transfer", data_dir), _fashion_mnist("test", data_dir)
    if scheme == "hf":
        return hf_datasets.open_pair(spec, image_column=image_column, label_column=label_column)
    root = _folder_root(spec)
    if not (root / "train").is_dir():
        raise DataError(
            f"{root} has no train/ folder; --data folder:PATH wants PATH/train and PATH/val with one subfolder per class "
            f"in each (for two separate folders use --transfer-data folder:A --eval-data folder:B)"
        )
    eval_root = next((root / n for n in EVAL_FOLDER_NAMES if (root / n).is_dir()), None)
    if eval_root is None:
        raise DataError(f"{root} has train/ but no evaluation folder ({'/, '.join(EVAL_FOLDER_NAMES)}/); add one, or give --eval-data folder:PATH")
    transfer = scan_folder(root / "train", name=f"folder:{root}/train")
    return transfer, scan_folder(eval_root, transfer.class_names, name=f"folder:{eval_root}")


def open_split(spec, role: str, class_names: list[str] | None = None, data_dir=None, *, image_column: str | None = None, label_column: str | None = None) -> DataSource:
    """One dataset for ``--transfer-data`` or ``--eval-data``: ``folder:PATH`` (class subfolders),
    ``fashion-mnist[:transfer|test|pool]`` (default: the transfer split for transfer, test for eval), or a
    Hugging Face dataset (hf-disk:PATH, hf-imagefolder:PATH, or the object; of a DatasetDict the split for ``role``)."""
    scheme = _check_scheme(spec)
    if scheme == "hf":
        return hf_datasets.open_one(spec, role, class_names, image_column=image_column, label_column=label_column)
    if scheme == "fashion-mnist":
        part = spec.partition(":")[2] or ("transfer" if role == "transfer" else "test")
        if part not in FASHION_MNIST_PARTS:
            raise ConfigError(f"fashion-mnist has the parts {', '.join(FASHION_MNIST_PARTS)}; got {part!r}")
        return _fashion_mnist(part, data_dir)
    root = _folder_root(spec)
    return scan_folder(root, class_names, name=f"folder:{root}")


def raw_image_size(preprocesses, image_size: int | None = None) -> int:
    """The side of the square raw images a folder is decoded to: the user's choice, else large enough
    that no model has to enlarge its crop (its ``input_size / crop_pct``), else 224."""
    if image_size is not None:
        if image_size < 1:
            raise ConfigError(f"--image-size must be a positive number of pixels; got {image_size}")
        return image_size
    needed = [max(p.input_size) / (p.crop_pct or 1.0) for p in preprocesses if p.input_size is not None]
    return max(round(n) for n in needed) if needed else DEFAULT_IMAGE_SIZE


def raw_channels(preprocesses) -> int:
    """Greyscale raw images when every model wants one channel, else RGB."""
    return 1 if preprocesses and all(p.in_chans == 1 for p in preprocesses) else 3


def materialize(
    source: DataSource,
    image_size: int,
    channels: int = 3,
    *,
    workers: int | None = None,
    skip_corrupt: bool = False,
    in_memory: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ImageData | FolderImageData:
    """Images ready for models: data already in memory as it is, a folder or dataset decoded (or streamed) at ``image_size``."""
    if isinstance(source, ImageData):
        return source
    kwargs = {"log": log} if log is not None else {}
    return load_folder(source, image_size, channels, workers=workers, skip_corrupt=skip_corrupt, in_memory=in_memory, **kwargs)


def choose_subset(
    source: DataSource,
    subset: str | float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    save_to: str | Path | None = None,
) -> tuple[DataSource, dict | None]:
    """Apply ``--subset FRACTION`` or ``--subset INDEX.json`` or ``--subset-per-class N``; the index is saved to ``save_to``."""
    if subset is None and per_class is None:
        return source, None
    if subset is not None and per_class is not None:
        raise ConfigError("give either --subset or --subset-per-class, not both")
    if subset is not None and not _is_number(subset):
        chosen, record = apply_subset_index(source, subset)
    else:
        chosen, record = make_subset(source, float(subset) if subset is not None else None, per_class, seed)
    if save_to is not None:
        save_subset_index(record, save_to)
    return chosen, record


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def load_data(
    spec: str | None = "fashion-mnist",
    *,
    transfer_data: str | None = None,
    eval_data: str | None = None,
    image_size: int | None = None,
    channels: int = 3,
    subset: str | float | None = None,
    subset_per_class: int | None = None,
    subset_seed: int = 0,
    subset_index_path: str | Path | None = None,
    workers: int | None = None,
    skip_corrupt: bool = False,
    in_memory: bool | None = None,
    data_dir=None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> DataSplits:
    """Transfer and evaluation data from specs, in one call (the CLI does the same in steps).

    Example: ``load_data("folder:imagenet", image_size=256, subset=0.1, subset_index_path="runs/subset.json")``.
    The subset applies to the transfer data; evaluation always uses the whole evaluation data.
    A spec may also be a ``datasets.Dataset`` (or ``DatasetDict``) object; ``image_column`` and
    ``label_column`` name its columns where they are not found by their features.
    """
    transfer, evaluation = open_sources(spec, transfer_data, eval_data, data_dir, image_column=image_column, label_column=label_column)
    transfer, record = choose_subset(transfer, subset, subset_per_class, subset_seed, subset_index_path)
    size = image_size or DEFAULT_IMAGE_SIZE
    options = dict(workers=workers, skip_corrupt=skip_corrupt, in_memory=in_memory)
    return DataSplits(materialize(transfer, size, channels, **options), materialize(evaluation, size, channels, **options), record)


def open_sources(spec, transfer_data, eval_data, data_dir=None, *, image_column: str | None = None, label_column: str | None = None) -> tuple[DataSource, DataSource]:
    """Resolve ``--data`` and/or ``--transfer-data``/``--eval-data`` (the separate ones win)."""
    used = [s for s in (transfer_data, eval_data) if s is not None]
    if spec is not None and len(used) < 2:
        used.append(spec)
    columns = dict(image_column=image_column, label_column=label_column)
    if (image_column or label_column) and not any(_check_scheme(s) == "hf" for s in used):
        raise ConfigError("--image-column and --label-column (image_column, label_column) name the columns of a Hugging Face dataset (hf-disk:PATH, hf-imagefolder:PATH); this data has none")
    transfer = evaluation = None
    if spec is not None and (transfer_data is None or eval_data is None):
        transfer, evaluation = open_data(spec, data_dir, **columns)
    if transfer_data is not None:
        transfer = open_split(transfer_data, "transfer", data_dir=data_dir, **columns)
    if eval_data is not None:
        class_names = transfer.class_names if isinstance(transfer, ImageListing) else None
        evaluation = open_split(eval_data, "eval", class_names, data_dir, **columns)
    if transfer is None or evaluation is None:
        raise ConfigError("name the data: --data fashion-mnist|folder:PATH|hf-disk:PATH, or both --transfer-data and --eval-data")
    if list(transfer.class_names) != list(evaluation.class_names):
        raise DataError(f"{transfer.name} and {evaluation.name} have different classes; transfer and evaluation data must share one label space")
    return transfer, evaluation
