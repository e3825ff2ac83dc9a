"""Labelled image data held as tensors (or, for models without image preprocessing, any input ``[N, ...]``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError


@dataclass
class ImageData:
    """Images ``[N, C, H, W]`` (uint8 in 0..255, or float already scaled) with int64 labels.

    A 3-D tensor is read as greyscale images ``[N, H, W]`` and given a channel axis. Any other
    input ``[N, ...]`` (tabular features ``[N, D]``, for example) is kept as it is, for models
    that take it without image preprocessing (:attr:`is_images` tells the two apart).
    ``name`` says where the data came from; together with the content it keys every cache
    that depends on the data (see :meth:`fingerprint`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = "data"
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.images.ndim == 3:  # [N, H, W] greyscale
            self.images = self.images.unsqueeze(1)
        if self.images.ndim == 0:
            raise DataError(f"{self.name}: the input needs a first axis of samples, [N, ...] (images [N, C, H, W]); got a single number")
        self.labels = torch.as_tensor(self.labels).long().reshape(-1)
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(
                f"{self.name}: labels must lie in 0..{self.num_classes - 1} for {self.num_classes} classes; "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_images(self) -> bool:
        """Whether the samples are images ``[C, H, W]``, as image preprocessing needs."""
        return self.images.ndim == 4

    def fingerprint(self) -> str:
        """A short hash of the name, the labels and every pixel."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=10)
            digest.update(self.name.encode())
            digest.update(str((tuple(self.images.shape), str(self.images.dtype))).encode())
            digest.update(self.images.contiguous().numpy().tobytes())
            digest.update(self.labels.numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str) -> "ImageData":
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[index], self.labels[index], self.class_names, name)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, images, labels)`` in the given order, straight from memory."""
        for index in order.split(batch_size):
            yield index, self.images[index], self.labels[index]


def stratified_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded sample of ``size`` items that keeps each class's share, and of the rest.

    Each class gets ``size × its share`` items, rounded so the total is exactly ``size``
    (largest remainders first), like a stratified shuffle split.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    total = len(labels)
    if not 0 <= size <= total:
        raise DataError(f"cannot take {size} of {total} samples")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / max(total, 1)
    quota = exact.floor().long()
    short = size - int(quota.sum())
    if short:
        by_remainder = torch.argsort(exact - quota.double(), descending=True, stable=True)
        quota[by_remainder[:short]] += 1
    shuffled = labels[order]
    picked = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        picked.append(order[shuffled == cls][:take])
    chosen = torch.sort(torch.cat(picked)).values if picked else torch.empty(0, dtype=torch.long)
    mask = torch.ones(total, dtype=torch.bool)
    mask[chosen] = False
    return chosen, torch.nonzero(mask).reshape(-1)


# Readers of other libraries' datasets, each with the test that recognises their objects: data.hf_datasets
# adds Hugging Face's. A table here, so that this module imports neither the readers nor those libraries.
DATASET_READERS: list[tuple[Callable[[object], bool], Callable[[object, str, Sequence[str] | None], ImageData]]] = []


def as_image_data(data, name: str, class_names: Sequence[str] | None = None) -> ImageData:
    """Accept an :class:`ImageData`, a pair ``(images, labels)``, a ``Dataset`` of ``(image, label)``
    or a Hugging Face ``datasets.Dataset`` (its image and label columns found by their features)."""
    if isinstance(data, ImageData):
        return data
    # Data streamed from disk (data.folder.FolderImageData) offers the same batches/labels/fingerprint.
    if callable(getattr(data, "batches", None)) and callable(getattr(data, "fingerprint", None)) and hasattr(data, "class_names"):
        return data
    for recognises, read in DATASET_READERS:
        if recognises(data):
            return read(data, name, class_names)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        images, labels = data
    elif isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]
        except Exception as exc:  # noqa: BLE001 - any failure of the user's dataset is reported as such
            raise DataError(f"{name}: could not read the dataset's items as (image, label): {exc}") from exc
        if not items:
            raise DataError(f"{name}: the dataset is empty")
        images = torch.stack([torch.as_tensor(image) for image, _ in items])
        labels = torch.as_tensor([int(label) for _, label in items])
    else:
        raise DataError(
            f"{name}: expected a pair of tensors (images, labels), a torch Dataset of (image, label), "
            f"a datasets.Dataset or ktransfer.ImageData; got {type(data).__name__}"
        )
    labels = torch.as_tensor(labels).long()
    if class_names is None:
        count = int(labels.max()) + 1 if len(labels) else 0
        class_names = [str(i) for i in range(count)]
    return ImageData(torch.as_tensor(images), labels, list(class_names), name)
