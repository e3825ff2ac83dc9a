"""Where a study's images come from: a registry of named loaders (Fashion-MNIST, image folders) that users can extend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..data.base import ImageData
from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from .config import DataConfig

DATA_SOURCES: dict[str, Callable[["DataConfig"], tuple[ImageData, ImageData]]] = {}


def register_data_source(name: str):
    """Register a loader ``fn(data_config) -> (transfer_set, eval_set)`` under a name a config can use."""

    def wrap(fn):
        DATA_SOURCES[name] = fn
        return fn

    return wrap


@register_data_source("fashion-mnist")
def _fashion_mnist(config: "DataConfig") -> tuple[ImageData, ImageData]:
    from ..data import fashion_mnist

    splits = fashion_mnist.load(config.dir)
    # fashion-mnist:validation evaluates on the validation split, where settings and predictors are fitted.
    evaluation = {"": splits.eval, "test": splits.eval, "validation": splits.validation}.get(config.source.partition(":")[2])
    if evaluation is None:
        raise ConfigError(f"data.source: {config.source!r} names no evaluation split; write fashion-mnist (the test set) or fashion-mnist:validation")
    return splits.transfer, evaluation


@register_data_source("folder")
def _folder(config: "DataConfig") -> tuple[ImageData, ImageData]:
    # folder:PATH with train/ and val/ class subfolders, through the data package's own loader.
    from ..data.sources import load_data

    splits = load_data(config.source, data_dir=config.dir)
    return splits.transfer, splits.eval


@dataclass
class StudyData:
    transfer: ImageData
    eval: ImageData




def search_split(data: StudyData, holdout: float, seed: int) -> StudyData:
    """The search phase's data: train on the transfer set less a stratified held-out part, score on that part (never the evaluation set).

    A held-out part that shares samples with the evaluation set is refused: the search would choose
    its setting on evaluation samples."""
    from ..data.base import stratified_split
    from ..data.overlap import overlap_phrase, shared_samples

    held_out, rest = stratified_split(data.transfer.labels, max(1, round(holdout * len(data.transfer))), seed)
    search = StudyData(data.transfer.subset(rest, f"{data.transfer.name}[search-train]"), data.transfer.subset(held_out, f"{data.transfer.name}[held-out]"))
    shared = shared_samples(search.eval, data.eval)
    if shared:
        raise DataError(
            f"the hyperparameter search scores on held-out transfer data, and {overlap_phrase(search.eval, data.eval, shared)}: the study's transfer data overlaps its "
            f"evaluation data, so the search would choose on evaluation samples; give data.source whose transfer and evaluation parts are disjoint "
            f"(e.g. fashion-mnist:validation, or folder:PATH with separate train/ and val/ images), or give each method one setting instead of a grid"
        )
    return search
