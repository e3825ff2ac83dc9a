"""Image folders (one subfolder per class, torchvision's ``ImageFolder`` layout) and stratified subsets.

Images on disk have all sizes; each model wants its own. So a folder is decoded once to square
*raw* images of one size (shorter side resized to ``image_size``, then center-cropped; uint8),
and every model's :class:`~ktransfer.models.Preprocess` crops, resizes and normalises that raw
batch its own way. The raw images live in memory as an :class:`ImageData` when they fit
(``in_memory``), else :class:`FolderImageData` decodes them per batch with worker processes.
Both give the engine the same ``batches(order, batch_size)``.

What is decoded is an :class:`ImageListing`: the files of a folder (:class:`FolderListing`) or the
rows of a Hugging Face dataset (``data.hf_datasets.DatasetListing``), read the same way.

(About 440 lines: listing, decoding in memory and streamed, and the subset index share the one
listing type; apart, each would need the others' internals.)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..paths import atomic_write_bytes
from .base import ImageData

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
DEFAULT_MEMORY_BUDGET = 4 * 1024**3  # raw uint8 bytes kept in memory before streaming from disk instead
SUBSET_FORMAT = "ktransfer-subset/1"


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def _require_pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise DataError("reading image folders needs Pillow; install it with: pip install pillow") from exc
    return Image, ImageOps


# ------------------------------------------------------------------------------------ listing


class ImageListing(ABC):
    """Encoded images and their labels, before any image is decoded: per sample, something PIL opens.

    Besides the methods below, a listing has ``labels`` (int64 ``[N]``), ``class_names``, ``name``
    (where the data came from, as the user named it) and ``location`` (the place its failures are
    reported in: a folder, a dataset).
    """

    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def open(self, index: int) -> Path | BinaryIO:
        """Sample ``index`` as ``PIL.Image.open`` takes it: a file's path, or its bytes as a binary file."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """Sample ``index`` in an error message: its file, its row."""

    @abstractmethod
    def identify(self, digest) -> None:
        """Feed ``digest`` (a hashlib object) what changes when a sample's image does, cheaply (no decoding)."""

    @abstractmethod
    def subset(self, indices: Sequence[int] | torch.Tensor, name: str) -> "ImageListing":
        """The listing of the samples ``indices``, in that order, named ``name``."""


@dataclass
class FolderListing(ImageListing):
    """The files of an image folder and their labels: what a folder holds, before any image is decoded."""

    root: Path
    files: list[str]  # relative to root, POSIX style
    labels: torch.Tensor
    class_names: list[str]
    name: str

    @property
    def location(self) -> str:
        return str(self.root)

    def open(self, index: int) -> Path:
        return self.root / self.files[index]

    def describe(self, index: int) -> str:
        return self.files[index]

    def identify(self, digest) -> None:
        """Every file's path, size and modification time."""
        for file in self.files:
            stat = (self.root / file).stat()
            digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str) -> "FolderListing":
        index = torch.as_tensor(indices, dtype=torch.long)
        return FolderListing(self.root, [self.files[i] for i in index.tolist()], self.labels[index], self.class_names, name)


def scan_folder(root: str | Path, class_names: Sequence[str] | None = None, name: str | None = None) -> FolderListing:
    """List ``root/CLASS/**/IMAGE`` files; classes sorted by name, or numbered as ``class_names`` says.

    Give ``class_names`` (those of the training folder) when scanning an evaluation folder, so both
    share one label space; a class folder not among them is an error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise DataError(f"{root} has no class subfolders; an image folder holds one subfolder per class (e.g. {root}/cat/001.jpg)")
    if class_names is None:
        class_names = found
    else:
        class_names = list(class_names)
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise DataError(f"{root} has class folders the training data lacks: {', '.join(unknown[:5])}{'...' if len(unknown) > 5 else ''}; both folders must share one set of classes")
    label_of = {c: i for i, c in enumerate(class_names)}
    files, labels = [], []
    for class_name in found:
        class_files = []
        for folder, subfolders, names in os.walk(root / class_name, followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            class_files.extend(Path(folder, n).relative_to(root).as_posix() for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS and not n.startswith("."))
        class_files.sort()
        files.extend(class_files)
        labels.extend([label_of[class_name]] * len(class_files))
    if not files:
        raise DataError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in its class subfolders)")
    return FolderListing(root, files, torch.tensor(labels, dtype=torch.long), list(class_names), name or f"folder:{root}")


# ------------------------------------------------------------------------------------ decoding


def decode_image(source: str | Path | BinaryIO, size: int, channels: int = 3) -> torch.Tensor:
    """One image (a file's path, or a binary file) as uint8 ``[channels, size, size]``: shorter side resized to ``size``, then center-cropped."""
    Image, ImageOps = _require_pillow()
    mode = "RGB" if channels == 3 else "L"
    with Image.open(source) as image:
        image.draft(mode, (size, size))  # JPEG: decode at a reduced scale when the file is much larger
        image = image.convert(mode)
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        array = np.array(image, dtype=np.uint8)
    tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1).contiguous() if channels == 3 else tensor.unsqueeze(0)


class _DecodedFiles(Dataset):
    """Decodes in worker processes; a failure comes back as its message, so it can be reported by file."""

    def __init__(self, listing: ImageListing, size: int, channels: int):
        self.listing, self.size, self.channels = listing, size, channels

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, index: int):
        try:
            return index, decode_image(self.listing.open(index), self.size, self.channels), None
        except Exception as exc:  # noqa: BLE001 - anything PIL raises for a bad file
            return index, None, f"{type(exc).__name__}: {exc}"


def _as_list(items):
    return items


def _stack_decoded(items):
    """In the worker: ``(indices of the decoded, their images stacked, [(index, error), ...])``."""
    decoded = [(i, image) for i, image, error in items if error is None]
    failures = [(i, error) for i, _, error in items if error is not None]
    index = torch.tensor([i for i, _ in decoded], dtype=torch.long)
    images = torch.stack([image for _, image in decoded]) if decoded else None
    return index, images, failures


def _loader(dataset: Dataset, batches: list[list[int]], workers: int, collate=_as_list, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, pin_memory=pin_memory)


def _failure_message(listing: ImageListing, failures: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"{listing.describe(index)} ({error})" for index, error in failures[:5])
    more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
    return f"{len(failures)} of {len(listing)} images in {listing.location} could not be read: {shown}{more}"


@dataclass
class FolderImageData:
    """Raw images of a folder (or of a dataset's rows) decoded per batch by ``workers`` processes (too many to hold in memory).

    Offers what the engine, the evaluator and the prediction cache use of :class:`ImageData`.
    """

    listing: ImageListing
    image_size: int
    channels: int = 3
    workers: int = field(default_factory=default_workers)
    pin_memory: bool = field(default_factory=torch.cuda.is_available)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def labels(self) -> torch.Tensor:
        return self.listing.labels

    @property
    def class_names(self) -> list[str]:
        return self.listing.class_names

    @property
    def name(self) -> str:
        return f"{self.listing.name}@{self.image_size}"

    @property
    def num_classes(self) -> int:
        return self.listing.num_classes

    def __len__(self) -> int:
        return len(self.listing)

    def fingerprint(self) -> str:
        """Hash of the name, raw size, labels, and what identifies the images (a folder: every file's path, size and modification time)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=10)
            digest.update(f"{self.name}|{self.image_size}|{self.channels}".encode())
            digest.update(self.labels.numpy().tobytes())
            self.listing.identify(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str) -> "FolderImageData":
        return FolderImageData(self.listing.subset(indices, name), self.image_size, self.channels, self.workers, self.pin_memory)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        chunks = [chunk.tolist() for chunk in order.split(batch_size)]
        # Pinned memory lets the engine's non_blocking copy to the GPU overlap the next batch's decoding.
        loader = _loader(_DecodedFiles(self.listing, self.image_size, self.channels), chunks, min(self.workers, len(chunks)), _stack_decoded, self.pin_memory)
        for index, images, failures in loader:
            if failures:
                raise DataError(_failure_message(self.listing, failures) + "; remove or fix them (loading the data into memory with skip_corrupt / --skip-corrupt leaves them out)")
            yield index, images, self.labels[index]


def _check_headers(listing: ImageListing, workers: int) -> list[tuple[int, str]]:
    """Images whose header cannot be read: cheap enough for data too large to decode up front."""
    dataset = _HeaderCheck(listing)
    chunks = [list(range(start, min(start + 256, len(listing)))) for start in range(0, len(listing), 256)]
    failures = []
    for items in _loader(dataset, chunks, min(workers, len(chunks))):
        failures.extend((i, error) for i, error in items if error is not None)
    return failures


class _HeaderCheck(Dataset):
    def __init__(self, listing: ImageListing):
        self.listing = listing

    def __len__(self):
        return len(self.listing)

    def __getitem__(self, index):
        Image, _ = _require_pillow()
        try:
            with Image.open(self.listing.open(index)) as image:
                image.size  # noqa: B018 - opening parses the header
            return index, None
        except Exception as exc:  # noqa: BLE001
            return index, f"{type(exc).__name__}: {exc}"


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def load_folder(
    listing: ImageListing,
    image_size: int,
    channels: int = 3,
    *,
    workers: int | None = None,
    skip_corrupt: bool = False,
    in_memory: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    log: Callable[[str], None] = _warn,
) -> ImageData | FolderImageData:
    """Raw images of ``listing`` (a folder's or a dataset's) at ``image_size``: decoded once into memory, or streamed from disk.

    ``in_memory=None`` keeps them in memory when they take at most ``memory_budget`` bytes.
    Unreadable images are an error that names them, unless ``skip_corrupt`` leaves them out
    (reported through ``log``). Streaming checks only each image's header up front.
    """
    if image_size < 1:
        raise ConfigError(f"image size must be a positive number of pixels; got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (greyscale) or 3 (RGB); got {channels}")
    _require_pillow()
    workers = default_workers() if workers is None else workers
    if in_memory is None:
        in_memory = len(listing) * channels * image_size * image_size <= memory_budget
    if not in_memory:
        failures = _check_headers(listing, workers)
        listing = _drop_failures(listing, failures, skip_corrupt, log)
        return FolderImageData(listing, image_size, channels, workers)

    images = torch.empty(len(listing), channels, image_size, image_size, dtype=torch.uint8)
    ok = torch.zeros(len(listing), dtype=torch.bool)
    failures = []
    chunks = [list(range(start, min(start + 64, len(listing)))) for start in range(0, len(listing), 64)]
    for index, decoded, batch_failures in _loader(_DecodedFiles(listing, image_size, channels), chunks, min(workers, len(chunks)), _stack_decoded):
        if decoded is not None:
            images[index], ok[index] = decoded, True
        failures.extend(batch_failures)
    kept = _drop_failures(listing, failures, skip_corrupt, log)
    if failures:
        images = images[ok]
    return ImageData(images, kept.labels, kept.class_names, f"{kept.name}@{image_size}")


def _drop_failures(listing: ImageListing, failures: list[tuple[int, str]], skip: bool, log) -> ImageListing:
    if not failures:
        return listing
    if not skip:
        raise DataError(_failure_message(listing, failures) + "; remove or fix them, or pass --skip-corrupt (skip_corrupt=True) to leave them out")
    bad = {index for index, _ in failures}
    keep = [i for i in range(len(listing)) if i not in bad]
    if not keep:
        raise DataError(f"none of the {len(listing)} images in {listing.location} could be read; first: {listing.describe(failures[0][0])} ({failures[0][1]})")
    log(f"skipped {_failure_message(listing, failures)}")
    return listing.subset(keep, listing.name)


# ------------------------------------------------------------------------------------ subsets


def stratified_subset(labels: torch.Tensor, fraction: float | None = None, per_class: int | None = None, seed: int = 0, num_classes: int | None = None) -> torch.Tensor:
    """Sorted indices of a seeded random subset with ``round(fraction * n_c)`` (at least 1) or
    ``min(per_class, n_c)`` samples of each class ``c``."""
    if (fraction is None) == (per_class is None):
        raise ConfigError("a stratified subset takes either a fraction or a count per class (not both)")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"the subset fraction must lie in (0, 1]; got {fraction}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"the subset's count per class must be at least 1; got {per_class}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes or 0)
    if fraction is not None:
        take = torch.where(counts > 0, (counts.double() * fraction).round().long().clamp(min=1), counts)
    else:
        take = counts.clamp(max=per_class)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    by_class = shuffled[torch.argsort(labels[shuffled], stable=True)]  # grouped by class, random within each
    class_start = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[by_class]
    rank = torch.arange(len(labels)) - class_start[sorted_labels]
    return by_class[rank < take[sorted_labels]].sort().values


def subset_index(source: ImageData | ImageListing, indices: torch.Tensor, *, fraction: float | None, per_class: int | None, seed: int) -> dict:
    """A JSON-ready record of a subset that :func:`apply_subset_index` turns back into the same subset."""
    labels = source.labels[indices]
    counts = torch.bincount(labels, minlength=source.num_classes).tolist()
    record = {
        "format": SUBSET_FORMAT,
        "data": source.name,
        "n_total": len(source),
        "n_subset": len(indices),
        "fraction": fraction,
        "per_class": per_class,
        "seed": seed,
        "class_names": list(source.class_names),
        "counts_per_class": dict(zip(source.class_names, counts)),
    }
    if isinstance(source, FolderListing):
        record["files"] = [source.files[i] for i in indices.tolist()]
    else:
        record["indices"] = indices.tolist()
        record["data_fingerprint"] = source.fingerprint()
    return record


def subset_name(name: str, fraction: float | None, per_class: int | None, seed: int) -> str:
    size = f"{fraction:g} per class" if fraction is not None else f"{per_class}/class"
    return f"{name}[stratified {size}, seed {seed}]"


def make_subset(source, fraction: float | None = None, per_class: int | None = None, seed: int = 0):
    """``(subset, index_record)``: the stratified subset of an :class:`ImageData` or an :class:`ImageListing`."""
    indices = stratified_subset(source.labels, fraction, per_class, seed, source.num_classes)
    record = subset_index(source, indices, fraction=fraction, per_class=per_class, seed=seed)
    return source.subset(indices, subset_name(source.name, fraction, per_class, seed)), record


def save_subset_index(record: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return path


def apply_subset_index(source, path: str | Path):
    """The subset a saved index describes, checked against ``source`` (same files, or same data)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read the subset index {path}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != SUBSET_FORMAT:
        raise DataError(f"{path} is not a ktransfer subset index (format {SUBSET_FORMAT})")
    name = f"{source.name}[subset {path.name}]"
    if "files" in record:
        if not isinstance(source, FolderListing):
            raise DataError(f"{path} lists image files, but the data {source.name} is not an image folder")
        position = {file: i for i, file in enumerate(source.files)}
        missing = [file for file in record["files"] if file not in position]
        if missing:
            raise DataError(f"{len(missing)} files of the subset index {path} are not in {source.root} (first: {missing[0]}); the folder changed since the index was made")
        indices = [position[file] for file in record["files"]]
    else:
        if isinstance(source, FolderListing) or record.get("data_fingerprint") != source.fingerprint():
            raise DataError(f"{path} was made for {record.get('data')} (fingerprint {record.get('data_fingerprint')}), not for {source.name}")
        indices = record["indices"]
    if list(record.get("class_names", source.class_names)) != list(source.class_names):
        raise DataError(f"{path} was made for other classes than {source.name} has")
    return source.subset(indices, name), record
