"""Shared fixtures: an isolated cache, tiny learnable image data, a small Fashion-MNIST look-alike on disk."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ktransfer.data import fashion_mnist
from ktransfer.data.base import ImageData

from ci_guard import pytest_collectreport, pytest_runtest_makereport, pytest_sessionfinish, pytest_terminal_summary  # noqa: E402,F401  (the CI guard: a skip under CI fails)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("KTRANSFER_CACHE", str(root))
    monkeypatch.delenv("KTRANSFER_FASHION_MNIST", raising=False)
    fashion_mnist._loaded.clear()
    return root


def make_images(count: int, seed: int, num_classes: int = 10, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose class shows as a bright horizontal band, plus noise: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    images = torch.randint(0, 90, (count, 1, size, size), generator=generator, dtype=torch.int64)
    band = size // num_classes
    for c in range(num_classes):
        rows = slice(c * band, c * band + band)
        images[labels == c, :, rows, :] += 120
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture
def tiny_data() -> tuple[ImageData, ImageData]:
    names = [f"class{i}" for i in range(10)]
    transfer = ImageData(*make_images(384, seed=1), names, "tiny/transfer")
    evaluation = ImageData(*make_images(256, seed=2), names, "tiny/eval")
    return transfer, evaluation


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload, compresslevel=1))
    else:
        path.write_bytes(payload)


@pytest.fixture
def small_fashion_mnist(tmp_path, monkeypatch) -> Path:
    """A Fashion-MNIST look-alike with 700 training and 200 test images, and the split sizes shrunk to fit."""
    monkeypatch.setitem(fashion_mnist.EXPECTED_COUNT, "train", 700)
    monkeypatch.setitem(fashion_mnist.EXPECTED_COUNT, "test", 200)
    monkeypatch.setattr(fashion_mnist, "POOL_SIZE", 500)
    monkeypatch.setattr(fashion_mnist, "TRANSFER_SIZE", 100)
    monkeypatch.setattr(fashion_mnist, "VALIDATION_SIZE", 200)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    train_images, train_labels = make_images(700, seed=3)
    test_images, test_labels = make_images(200, seed=4)
    write_idx(folder / "train-images-idx3-ubyte", train_images.squeeze(1).numpy())
    write_idx(folder / "train-labels-idx1-ubyte", train_labels.numpy())
    write_idx(folder / "t10k-images-idx3-ubyte", test_images.squeeze(1).numpy())
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels.numpy())
    return folder


@pytest.fixture
def tiny_zoo(monkeypatch):
    """Shrink the default zoo's recipes so zoo models train in well under a second each."""
    from ktransfer.models import store

    tiny = {name: store.ZooRecipe(recipe.arch, recipe.seed, private_size=200, epochs=1, lr=recipe.lr, batch_size=64) for name, recipe in store.DEFAULT_ZOO.items()}
    monkeypatch.setattr(store, "DEFAULT_ZOO", tiny)
    import ktransfer.demo as demo

    monkeypatch.setattr(demo, "DEFAULT_ZOO", tiny)
    return tiny
