"""Where a study's images come from: a registry of named loaders (Fashion-MNIST, image folders, Hugging Face datasets) that users can extend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..data.base import ImageData
from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from .config import DataConfig

DATA_SOURCES: dict[str, Callable[["DataConfig"], tuple]] = {}


def register_data_source(name: str):
    """Register a loader ``fn(data_config) -> (transfer_set, eval_set)`` under a name a config can use.

    A loader may return a third element, the validation data the guard selects on (``guard: true``);
    without it a guarded run holds out a share of the transfer data instead.
    """

    def wrap(fn):
        DATA_SOURCES[name] = fn
        return fn

    return wrap


@register_data_source("fashion-mnist")
def _fashion_mnist(config: "DataConfig") -> tuple[ImageData, ImageData, ImageData | None]:
    from ..data import fashion_mnist

    splits = fashion_mnist.load(config.dir)
    # fashion-mnist:validation evaluates on the validation split, where settings and predictors are fitted.
    evaluation = {"": splits.eval, "test": splits.eval, "validation": splits.validation}.get(config.source.partition(":")[2])
    if evaluation is None:
        raise ConfigError(f"data.source: {config.source!r} names no evaluation split; write fashion-mnist (the test set) or fashion-mnist:validation")
    transfer_set = splits.transfer_set(config.setting)  # paper: the zoo's own training images; new-data: the validation split
    # The guard selects on the validation split, unless the students train on it (new-data): then on a held-out share.
    return transfer_set, evaluation, None if transfer_set is splits.validation else splits.validation


@register_data_source("folder")
@register_data_source("hf-disk")
@register_data_source("hf-imagefolder")
def _folder(config: "DataConfig") -> tuple[ImageData, ImageData]:
    # folder:PATH with train/ and val/ class subfolders, or a Hugging Face dataset with train and validation
    # splits (hf-disk:PATH, hf-imagefolder:PATH), through the data package's own loader.
    from ..data.sources import load_data

    if config.setting != "paper":
        raise ConfigError(f"data.setting: {config.setting!r} is a Fashion-MNIST split; a {config.scheme} source transfers on its train split (leave setting out)")
    splits = load_data(config.source, data_dir=config.dir)
    return splits.transfer, splits.eval


@dataclass
class StudyData:
    transfer: ImageData
    eval: ImageData
    validation: ImageData | None = None  # the guard's data; None: a guarded run holds out a share of ``transfer``


def same_images(first: ImageData, second: ImageData) -> bool:
    """Whether two data sets hold the same images and labels (whatever their names)."""
    return first is second or (
        first.images.shape == second.images.shape and torch.equal(first.labels, second.labels) and torch.equal(first.images, second.images)
    )


def search_split(data: StudyData, holdout: float, seed: int) -> StudyData:
    """The search phase's data: train on the transfer set less a stratified held-out part, score on that part (never the evaluation set).

    A held-out part that shares samples with the evaluation set is refused: the search would choose
    its setting on evaluation samples."""
    from ..data.base import stratified_split
    from ..data.overlap import overlap_phrase, shared_samples

    held_out, rest = stratified_split(data.transfer.labels, max(1, round(holdout * len(data.transfer))), seed)
    search = StudyData(data.transfer.subset(rest, f"{data.transfer.name}[search-train]"), data.transfer.subset(held_out, f"{data.transfer.name}[held-out]"), data.validation)
    shared = shared_samples(search.eval, data.eval)
    if shared:
        raise DataError(
            f"the hyperparameter search scores on held-out transfer data, and {overlap_phrase(search.eval, data.eval, shared)}: the study's transfer data overlaps its "
            f"evaluation data, so the search would choose on evaluation samples; give data.source whose transfer and evaluation parts are disjoint "
            f"(e.g. fashion-mnist:validation, or folder:PATH with separate train/ and val/ images), or give each method one setting instead of a grid"
        )
    return search
