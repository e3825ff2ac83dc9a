"""Which samples two datasets share: what must never choose anything (the guard's epoch, a study's
search, a scouting predictor's test score) is checked to share no sample with the data it is judged on.

A sample is identified by its content where both datasets hold their images in memory (a hash of
its pixels, their shape and type, and its label), and by its file where both stream image files
from disk (device and inode, so a symlinked folder, a hard link or another spelling of the same path
is the same file). Where only one side streams, its files are decoded once to compare content.
Hashing is cheap next to training: 10,000 Fashion-MNIST images take about 0.1 s.
"""

from __future__ import annotations

import hashlib
import os

import torch

from .base import ImageData
from .folder import FolderListing

HASH_BATCH = 512  # streamed files decoded per batch, only where content must be compared


def _streamed_files(data) -> list | None:
    """Per sample, the identity of its file (device, inode), for data streamed from an image folder; else None."""
    listing = getattr(data, "listing", None)
    if not isinstance(listing, FolderListing) or isinstance(data, ImageData):
        return None
    keys = []
    for file in listing.files:
        path = listing.root / file
        try:
            stat = os.stat(path)  # follows symlinks: a linked file is the file it links to
            keys.append((stat.st_dev, stat.st_ino))
        except OSError:  # gone since it was listed: its resolved path is the best identity left
            keys.append(str(path.resolve()))
    return keys


def _sample_hash(image: torch.Tensor, label: int) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(image.shape)}|{image.dtype}|{label}|".encode())
    digest.update(image.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def _content_keys(data) -> list[bytes]:
    """Per sample, a hash of its pixels and label (streamed data is decoded batch by batch for it)."""
    if isinstance(data, ImageData):
        labels = data.labels.tolist()
        return [_sample_hash(data.images[i], labels[i]) for i in range(len(data))]
    keys: list[bytes | None] = [None] * len(data)
    for index, images, labels in data.batches(torch.arange(len(data)), HASH_BATCH):
        for i, image, label in zip(index.tolist(), images.cpu(), labels.tolist()):
            keys[i] = _sample_hash(image, label)
    return keys


def shared_samples(data, other) -> int:
    """How many samples of ``data`` are also samples of ``other`` (0: the two are disjoint)."""
    if data is other:
        return len(data)
    files, other_files = _streamed_files(data), _streamed_files(other)
    if files is not None and other_files is not None:
        keys, other_keys = files, other_files
    else:
        keys, other_keys = _content_keys(data), _content_keys(other)
    known = set(other_keys)
    return sum(1 for key in keys if key in known)


def overlap_phrase(data, other, shared: int) -> str:
    """``data`` against ``other`` in words, for an error: '... is the evaluation data', '... lies inside it', '... shares N samples with it'."""
    if shared == len(data) == len(other):
        return f"{data.name} is the evaluation data {other.name} (all {len(data):,} samples)"
    if shared == len(data):
        return f"{data.name} lies inside the evaluation data {other.name} (all its {len(data):,} samples are evaluation samples)"
    return f"{data.name} shares {shared:,} of its {len(data):,} samples with the evaluation data {other.name}"
