"""Fashion-MNIST: find its IDX files (user path, Debian package, user cache), read and split them."""

from __future__ import annotations

import gzip
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..paths import cache_dir
from .base import ImageData, stratified_split

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
ENV_VAR = "KTRANSFER_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# The dataset authors' official mirror; overridable for private mirrors.
DOWNLOAD_URL = os.environ.get("KTRANSFER_FASHION_MNIST_URL", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
MEAN, STD = 0.2860, 0.3530  # over the 60k training images, pixels in [0, 1]

# The splits every zoo model, the demo, `transfer --data fashion-mnist` and studies rely on.
POOL_SIZE = 50_000  # first 50k training images: the zoo's pretraining pool
VALIDATION_SIZE = 10_000  # last 10k training images: never seen by the zoo; every setting is chosen on them
# The paper's setting: a stratified part of the pool, data every zoo model trained on. The paper took 10% of
# ImageNet; 20% here, because on the validation split 5k images moved the students too little to show anything.
TRANSFER_SIZE = 10_000
TRANSFER_SEED = 1234  # the seed of the authors' stratified split
SETTINGS = ("paper", "new-data")


def download_dir() -> Path:
    return cache_dir() / "fashion-mnist"


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, stem) for stem in FILES.values())


def locate(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files, searched in the documented order."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"Fashion-MNIST folder {folder} does not exist; {_how_to_get_it()}")
        if not _complete(folder):
            missing = [stem for stem in FILES.values() if not _find_file(folder, stem)]
            raise DataError(f"Fashion-MNIST folder {folder} lacks {', '.join(missing)} (.gz or plain); {_how_to_get_it()}")
        return folder
    if env := os.environ.get(ENV_VAR):
        return locate(env)
    for folder in (DEBIAN_DIR, download_dir()):
        if _complete(folder):
            return folder
    raise DataError(f"Fashion-MNIST not found. {_how_to_get_it()}")


def _how_to_get_it() -> str:
    return (
        f"get it one of three ways: (1) point --data-dir or ${ENV_VAR} at a folder with the four IDX files; "
        f"(2) on Debian/Ubuntu run 'apt-get install dataset-fashion-mnist' (installs to {DEBIAN_DIR}); "
        f"(3) run 'ktransfer data download' to fetch it into {download_dir()}"
    )


def download(target: Path | None = None, base_url: str = DOWNLOAD_URL) -> Path:
    """Fetch the four gzipped IDX files into the user's cache; files already there are kept."""
    target = target or download_dir()
    target.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        path = target / f"{stem}.gz"
        if path.is_file():
            continue
        url = base_url.rstrip("/") + f"/{stem}.gz"
        tmp = path.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download {url}: {exc}; {_how_to_get_it()}") from exc
        os.replace(tmp, path)
    for split in ("train", "test"):  # refuse a bad download now rather than at first use
        read_split(target, split)
    return target


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({exc}); delete it and fetch it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {expected_ndim} dimensions; delete it and fetch it again")
    header_end = 4 + 4 * expected_ndim
    if len(raw) < header_end:
        raise DataError(f"{path} is truncated in its header; delete it and fetch it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    expected_bytes = header_end + int(np.prod(shape))
    if len(raw) != expected_bytes:
        raise DataError(f"{path} holds {len(raw)} bytes where its header promises {expected_bytes}: truncated or corrupt; delete it and fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def _require_file(folder: Path, stem: str) -> Path:
    path = _find_file(folder, stem)
    if path is None:
        raise DataError(f"Fashion-MNIST folder {folder} lacks {stem} (.gz or plain); {_how_to_get_it()}")
    return path


def read_split(folder: Path, split: str) -> ImageData:
    prefix = "train" if split == "train" else "test"
    images = _read_idx(_require_file(folder, FILES[f"{prefix}_images"]), 3)
    labels = _read_idx(_require_file(folder, FILES[f"{prefix}_labels"]), 1)
    if len(images) != len(labels) or len(images) != EXPECTED_COUNT[split]:
        raise DataError(
            f"Fashion-MNIST {split} split in {folder} has {len(images)} images and {len(labels)} labels; "
            f"expected {EXPECTED_COUNT[split]} of each"
        )
    if labels.max() >= len(CLASS_NAMES):
        raise DataError(f"Fashion-MNIST {split} labels in {folder} go up to {labels.max()}; expected 0..9")
    return ImageData(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), list(CLASS_NAMES), f"fashion-mnist/{split}")


@dataclass
class FashionMNISTSplits:
    """The four disjoint-by-role parts of Fashion-MNIST that the zoo, the demo and studies share.

    ``transfer`` lies inside ``pool`` (the paper's setting: the students have trained on it);
    ``validation`` and ``eval`` were never seen by the zoo. Choices are made on ``validation``;
    ``eval`` (the official test set) only evaluates.
    """

    pool: ImageData  # the zoo's pretraining pool: the first 50k training images
    transfer: ImageData  # a stratified 20% of the pool, seen by every zoo model
    validation: ImageData  # the last 10k training images, unseen by the zoo
    eval: ImageData  # the official test set
    transfer_index: torch.Tensor  # positions of ``transfer`` in ``pool``

    def transfer_set(self, setting: str = "paper") -> ImageData:
        """The transfer data of a setting: ``paper`` (seen data) or ``new-data`` (the unseen validation images)."""
        if setting not in SETTINGS:
            raise DataError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
        return self.transfer if setting == "paper" else self.validation


_loaded: dict[Path, FashionMNISTSplits] = {}


def load(data_dir: str | os.PathLike | None = None) -> FashionMNISTSplits:
    folder = locate(data_dir).resolve()
    if folder not in _loaded:
        train = read_split(folder, "train")
        test = read_split(folder, "test")
        pool = train.subset(range(POOL_SIZE), "fashion-mnist/pool")
        transfer_index, _ = stratified_split(pool.labels, TRANSFER_SIZE, TRANSFER_SEED)
        _loaded[folder] = FashionMNISTSplits(
            pool=pool,
            transfer=pool.subset(transfer_index, "fashion-mnist/transfer"),
            validation=train.subset(range(POOL_SIZE, POOL_SIZE + VALIDATION_SIZE), "fashion-mnist/validation"),
            eval=ImageData(test.images, test.labels, test.class_names, "fashion-mnist/test"),
            transfer_index=transfer_index,
        )
    return _loaded[folder]
