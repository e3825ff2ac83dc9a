"""Hugging Face ``datasets`` as data: ``hf-disk:PATH``, ``hf-imagefolder:PATH`` and ``datasets.Dataset`` objects.

``hf-disk:PATH`` opens a folder written by ``save_to_disk`` (``datasets.load_from_disk``), a
``DatasetDict`` or a single ``Dataset``; ``hf-imagefolder:PATH`` a folder of images through
``datasets``' own ``imagefolder`` loader (class subfolders, optional ``train/`` and ``val/``). In
Python a ``Dataset`` or ``DatasetDict`` object stands where a spec does.

A dataset's image column (a ``datasets.Image`` feature) and label column (a ``ClassLabel``) are found
by their features, or named (``--image-column``, ``--label-column``); the class names are the
ClassLabel's. Its rows become a :class:`DatasetListing`, which ``data.folder`` decodes exactly like a
folder's files: square raw images at one size, in memory when they fit, else streamed per batch by
worker processes from the dataset's memory-mapped files; stratified subsets and their saved index
work the same. Of a ``DatasetDict``, ``train`` is the transfer data and ``val``, ``validation`` or
``test`` the evaluation data, as for a folder's ``train/`` and ``val/``.

Needs the ``hf`` extra (``pip install 'ktransfer[hf]'``); without it ``datasets`` is never imported.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..extras import require
from .base import DATASET_READERS, ImageData
from .folder import FolderImageData, ImageListing, _require_pillow, load_folder

SCHEMES = ("hf-disk", "hf-imagefolder")
TRANSFER_SPLIT = "train"
EVAL_SPLITS = ("val", "validation", "test")  # tried in this order, as a folder's evaluation folders
GREYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
HF_TYPES = frozenset({"Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict"})


def is_hf_dataset(data) -> bool:
    """Whether ``data`` is a ``datasets`` object (``Dataset``, ``DatasetDict``, ...), told by its type's name and
    module (``datasets.arrow_dataset``, ...), so that ``datasets`` is imported only where such an object exists."""
    return any(cls.__module__.startswith("datasets.") and cls.__name__ in HF_TYPES for cls in type(data).__mro__)


def _datasets():
    return require("datasets", "hf", "Hugging Face datasets as data (hf-disk:, hf-imagefolder:, datasets.Dataset)")


# ------------------------------------------------------------------------------------ listing


@dataclass
class DatasetListing(ImageListing):
    """Rows of a Hugging Face dataset and their labels, the images still encoded as the dataset stores them.

    ``dataset`` holds only the image column, with decoding off: a row's image is ``{"bytes", "path"}``
    (bytes where the dataset embeds them, a path where it refers to files, as imagefolder does).
    """

    dataset: Any  # datasets.Dataset
    image_column: str
    rows: torch.Tensor  # per sample, its row in `dataset`
    labels: torch.Tensor
    class_names: list[str]
    name: str
    location: str  # the dataset as the user named it, for messages; kept by subsets

    def _stored(self, index: int) -> dict:
        stored = self.dataset[int(self.rows[index])][self.image_column]
        if not stored or (stored.get("bytes") is None and not stored.get("path")):
            raise ValueError("the row holds no image")
        return stored

    def open(self, index: int) -> Path | BinaryIO:
        stored = self._stored(index)
        return io.BytesIO(stored["bytes"]) if stored.get("bytes") is not None else Path(stored["path"])

    def describe(self, index: int) -> str:
        row = f"row {int(self.rows[index])}"
        try:
            path = self._stored(index).get("path")
        except ValueError:
            return row
        return f"{row} ({path})" if path else row

    def identify(self, digest) -> None:
        """The dataset's fingerprint (``datasets``' own identity of its table and the transforms that made it),
        the image column, the rows, and the dataset's files' paths, sizes and modification times."""
        self._identify_rows(digest)
        for cache_file in self.dataset.cache_files:
            stat = os.stat(cache_file["filename"])
            digest.update(f"{cache_file['filename']}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())

    def fingerprint(self) -> str:
        """A short hash of the labels and the rows' identity, not of where the dataset lies: what a saved
        subset index is checked against, so that it holds for a copy of the dataset too."""
        digest = hashlib.blake2b(digest_size=10)
        digest.update(self.labels.numpy().tobytes())
        self._identify_rows(digest)
        return digest.hexdigest()

    def _identify_rows(self, digest) -> None:
        digest.update(f"{self.dataset._fingerprint}|{self.image_column}\n".encode())
        digest.update(self.rows.numpy().tobytes())

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str) -> "DatasetListing":
        index = torch.as_tensor(indices, dtype=torch.long)
        return DatasetListing(self.dataset, self.image_column, self.rows[index], self.labels[index], self.class_names, name, self.location)


def _kind(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__} {dtype}" if type(feature).__name__ == "Value" else type(feature).__name__


def _columns(features) -> str:
    return ", ".join(f"{column} ({_kind(feature)})" for column, feature in features.items()) or "none"


def _is_integer(feature, datasets) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _pick(features, given: str | None, wanted, what: str, option: str, where: str, hint: str) -> str:
    """The column named ``given``, else the one column whose feature is ``wanted``."""
    if given is not None:
        if given not in features:
            raise DataError(f"{where} has no column {given!r} (named by {option}); its columns: {_columns(features)}")
        return given
    found = [column for column, feature in features.items() if isinstance(feature, wanted)]
    if len(found) > 1:
        raise DataError(f"{where} has several {what} columns ({', '.join(found)}); choose one with {option}")
    if not found:
        raise DataError(f"{where} has no {what} column (a datasets.{wanted.__name__} feature); its columns: {_columns(features)}. {hint}")
    return found[0]


def _labels(dataset, column: str, class_names: Sequence[str] | None, where: str, option: str) -> tuple[torch.Tensor, list[str]]:
    """The label column as class numbers, with the class names: a ClassLabel's names, renumbered onto
    ``class_names`` where they are given (the transfer data's); integers as they are, named 0..K-1."""
    datasets = _datasets()
    feature = dataset.features[column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    if not is_class_label and not _is_integer(feature, datasets):
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            raise DataError(
                f"{where}: the label column {column!r} holds strings, not class numbers; turn it into a ClassLabel first: "
                f"dataset = dataset.class_encode_column({column!r}) (then save_to_disk again)"
            )
        raise DataError(f"{where}: the label column {column!r} is {_kind(feature)}, not a ClassLabel (nor integers); name the label column with {option}")
    values = dataset.select_columns([column]).with_format("numpy")[:][column]
    labels = torch.from_numpy(np.asarray(values).astype(np.int64))
    if len(labels) and int(labels.min()) < 0:
        missing = int((labels < 0).sum())
        raise DataError(f"{where}: {missing:,} of {len(labels):,} rows have no label ({int(labels.min())} in {column!r}), as a test split without labels has; give labelled data")
    if not is_class_label:
        count = int(labels.max()) + 1 if len(labels) else 0
        names = list(class_names) if class_names is not None else [str(i) for i in range(count)]
        if count > len(names):
            raise DataError(f"{where}: the label column {column!r} holds class {count - 1}, but the transfer data has {len(names)} classes")
        return labels, names
    names = list(feature.names)
    if class_names is None or names == list(class_names):
        return labels, names
    position = {name: i for i, name in enumerate(class_names)}
    present = [names[i] for i in torch.unique(labels).tolist()]
    unknown = [name for name in present if name not in position]
    if unknown:
        raise DataError(f"{where} has classes the transfer data lacks: {', '.join(unknown[:5])}{'...' if len(unknown) > 5 else ''}; both must share one set of classes")
    renumber = torch.tensor([position.get(name, -1) for name in names], dtype=torch.long)
    return renumber[labels], list(class_names)


# How the messages tell a user to name a column: the data options (and load_data's arguments), or for an
# object given straight to transfer(...), load_data, which takes them.
OPTION_NAMING = ("--image-column (image_column=)", "--label-column (label_column=)")
OBJECT_NAMING = tuple(f"load_data(transfer_data=dataset, eval_data=..., {column}=NAME) of ktransfer.data.sources" for column in ("image_column", "label_column"))


def dataset_listing(
    dataset,
    name: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    naming: tuple[str, str] = OPTION_NAMING,
) -> DatasetListing:
    """The rows of one ``datasets.Dataset`` as a listing: its image and label columns found (or named), its
    class names from the ClassLabel, or ``class_names`` (those of the transfer data) with its labels renumbered onto them."""
    datasets = _datasets()
    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(
            f"{name} is an IterableDataset (load_dataset(..., streaming=True)), which cannot be read by row; load it without streaming=True: "
            f"ktransfer streams from the dataset's memory-mapped files itself when its images do not fit in memory"
        )
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{name} is a DatasetDict of the splits {', '.join(dataset)}; give one split, e.g. dataset[{next(iter(dataset), 'train')!r}]")
    features = dataset.features
    image_option, label_option = naming
    image = _pick(
        features, image_column, datasets.Image, "image", image_option, name,
        f"Name the column of images with {image_option}; a column of image files or bytes becomes one with dataset.cast_column(NAME, datasets.Image())",
    )
    if not isinstance(features[image], datasets.Image):
        raise DataError(f"{name}: the column {image!r} is {_kind(features[image])}, not images (a datasets.Image feature); name the image column with {image_option}")
    integers = [column for column, feature in features.items() if _is_integer(feature, datasets)]
    label = _pick(
        features, label_column, datasets.ClassLabel, "label", label_option, name,
        f"Name it with {label_option}: an integer column ({', '.join(integers)}) is read as the classes 0..K-1" if integers
        else f"Name it with {label_option}, or make one with dataset.class_encode_column(NAME)",
    )
    labels, names = _labels(dataset, label, class_names, name, label_option)
    images = dataset.select_columns([image]).cast_column(image, datasets.Image(decode=False))
    return DatasetListing(images, image, torch.arange(len(labels)), labels, names, name, name)


# ------------------------------------------------------------------------------------ specs and splits


def _open_spec(spec: str):
    """The ``Dataset`` or ``DatasetDict`` that ``hf-disk:PATH`` or ``hf-imagefolder:PATH`` names."""
    scheme, _, path = spec.partition(":")
    scheme = scheme.strip().lower()
    if not path:
        raise ConfigError(f"data spec {spec!r} names no folder; write {scheme}:PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{spec}: there is no folder {root}")
    datasets = _datasets()
    if scheme == "hf-disk":
        if not (root / "dataset_dict.json").is_file() and not (root / "state.json").is_file():
            raise DataError(
                f"{spec}: {root} is not a folder written by save_to_disk (it holds neither dataset_dict.json nor state.json); "
                f"a folder of images is hf-imagefolder:{path} or folder:{path}"
            )
        try:
            return datasets.load_from_disk(str(root))
        except (OSError, ValueError) as exc:
            raise DataError(f"{spec}: datasets could not load {root} ({type(exc).__name__}: {exc}); write it again with save_to_disk") from None
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    except (FileNotFoundError, ValueError) as exc:  # datasets' EmptyDatasetError; a split folder without images
        raise DataError(f"{spec}: datasets' imagefolder loader found no images in {root} ({exc}); it wants image files, in one subfolder per class") from None


def _opened(source) -> tuple[Any, str, str]:
    """``(dataset or DatasetDict, its name, how to name one split of it)`` for a spec or an object."""
    if is_hf_dataset(source):
        return source, f"datasets.{type(source).__name__}", "pass one split of it, e.g. dataset['validation']"
    return _open_spec(source), source, f"name one split's folder instead ({source.rstrip('/')}/SPLIT)"


def _split(dataset, name: str, role: str, hint: str) -> tuple[Any, str]:
    """``(Dataset, its name)`` for ``role``: a Dataset as it is, and so a DatasetDict of one split (imagefolder's
    of a folder without split folders); of others the train split for transfer, the first evaluation
    split (val, validation, test) for evaluation."""
    datasets = _datasets()
    if not isinstance(dataset, datasets.DatasetDict):
        return dataset, name
    wanted = (TRANSFER_SPLIT,) if role == "transfer" else EVAL_SPLITS
    split = next(iter(dataset)) if len(dataset) == 1 else next((s for s in wanted if s in dataset), None)
    if split is None:
        raise DataError(f"{name} has the splits {', '.join(dataset) or 'none'}, but no {' or '.join(wanted)} split for the {role} data; {hint}")
    return dataset[split], f"{name}[{split}]"


def open_pair(source, *, image_column: str | None = None, label_column: str | None = None) -> tuple[DatasetListing, DatasetListing]:
    """``(transfer, eval)`` for ``--data hf-disk:PATH`` (or a ``DatasetDict``): its train and evaluation splits, in one label space."""
    dataset, name, _ = _opened(source)
    splits = list(dataset) if isinstance(dataset, _datasets().DatasetDict) else []
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    if TRANSFER_SPLIT not in splits or eval_split is None:
        held = f"the splits {', '.join(splits)}" if splits else "one dataset"
        raise DataError(
            f"{name} holds {held}; as --data it needs a {TRANSFER_SPLIT} split and a {', '.join(EVAL_SPLITS[:-1])} or {EVAL_SPLITS[-1]} split. "
            f"Give the transfer and evaluation data separately instead (--transfer-data and --eval-data)"
        )
    columns = dict(image_column=image_column, label_column=label_column)
    transfer = dataset_listing(dataset[TRANSFER_SPLIT], f"{name}[{TRANSFER_SPLIT}]", **columns)
    return transfer, dataset_listing(dataset[eval_split], f"{name}[{eval_split}]", class_names=transfer.class_names, **columns)


def open_one(source, role: str, class_names: Sequence[str] | None = None, *, image_column: str | None = None, label_column: str | None = None) -> DatasetListing:
    """The data of one role (``transfer`` or ``eval``) from a spec or an object: a Dataset, or a DatasetDict's split for that role."""
    dataset, name, hint = _opened(source)
    return dataset_listing(*_split(dataset, name, role, hint), image_column=image_column, label_column=label_column, class_names=class_names)


# ------------------------------------------------------------------------------------ objects given as data


def image_data(dataset, name: str, class_names: Sequence[str] | None = None) -> ImageData | FolderImageData:
    """A ``datasets.Dataset`` given where data is taken (``ktransfer.transfer(...)``), with its columns found.

    Its images are decoded like a folder's at the size of the first one (its shorter side; the
    square images of most datasets at their own size), greyscale kept as one channel, in memory when
    they fit, else streamed. For another raw size, a subset or named columns, open it with
    ``load_data(dataset, image_size=...)`` (a DatasetDict) or ``load_data(transfer_data=..., eval_data=...)``.
    """
    listing = dataset_listing(dataset, name, class_names=class_names, naming=OBJECT_NAMING)
    if not len(listing):
        raise DataError(f"{name} is empty: it holds no samples; give it at least one labelled image")
    Image, _ = _require_pillow()
    try:
        with Image.open(listing.open(0)) as first:
            size, greyscale = min(first.size), first.mode in GREYSCALE_MODES
    except Exception as exc:  # noqa: BLE001 - anything PIL raises for a bad image
        raise DataError(f"{name}: its first image, {listing.describe(0)}, could not be read ({type(exc).__name__}: {exc})") from None
    return load_folder(listing, size, 1 if greyscale else 3)


DATASET_READERS.append((is_hf_dataset, image_data))
