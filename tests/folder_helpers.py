"""Tiny image folders for tests: one subfolder per class, images of mixed sizes and formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("blue", "green", "red")


def class_image(label: int, rng: np.random.Generator, size: tuple[int, int], invert: bool = False) -> np.ndarray:
    """An RGB image whose class shows as its brightest channel, with noise: learnable in a few steps."""
    height, width = size
    image = rng.integers(0, 80, (height, width, 3))
    image[..., 2 - label] += 150  # blue=0 -> channel 2, green=1 -> 1, red=2 -> 0
    image = image.clip(0, 255).astype(np.uint8)
    return 255 - image if invert else image


def write_image_folder(root: Path, per_class: int, seed: int = 0, invert: bool = False, classes=CLASSES) -> Path:
    """``root/CLASS/IMAGE`` with ``per_class`` images per class, sizes 20..40 pixels, PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(20, 41)), int(rng.integers(20, 41)))
            image = Image.fromarray(class_image(label, rng, size, invert))
            suffix = ".png" if i % 2 == 0 else ".jpg"
            image.save(folder / f"{name}_{i:03d}{suffix}", quality=95)
    return root


def write_split_folder(root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0, invert: bool = False) -> Path:
    """``root/train`` and ``root/val`` as ``--data folder:root`` expects."""
    write_image_folder(root / "train", train_per_class, seed, invert)
    write_image_folder(root / "val", val_per_class, seed + 1000, invert)
    return root


# A module of tiny models for three-class 12x12 colour images, for tests that load models by
# package.module:factory spec (written into a folder on sys.path by the test).
TINY_NETS = '''
import torch
from torch import nn


def make(width=4):
    torch.manual_seed(width)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, width), nn.ReLU(), nn.Linear(width, 3))
'''
