"""The embedded zoo's recipes and where their trained weights are cached (as safetensors).

Training them is :mod:`ktransfer.pretrain`'s, a layer above (it uses the engine).

A zoo model is an architecture plus a recipe: its training data (the shared transfer set, which
every zoo model sees, plus a seeded private part of the rest of the pretraining pool) and its
training settings (a cosine schedule to zero, so each model ends converged). The cache key covers
the recipe and the content of the pool and the transfer set, so a change of any retrains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data import fashion_mnist
from ..data.base import ImageData
from ..errors import ModelError
from ..paths import cache_dir
from .base import Preprocess
from .zoo import ZOO_ARCHITECTURES

ZOO_FORMAT = 3  # bump when architectures change: old weights are then retrained, not misloaded
FASHION_MNIST_PREPROCESS = Preprocess(mean=(fashion_mnist.MEAN,), std=(fashion_mnist.STD,), input_size=(28, 28), in_chans=1)


@dataclass(frozen=True)
class ZooRecipe:
    """How one zoo model is trained: on the transfer set plus ``private_size`` other pool images of its own."""

    arch: str
    seed: int
    private_size: int = 10_000
    epochs: int = 6
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "none"  # the training batches' augmentation, one of settings.AUGMENTS; the default zoo trains without

    def key(self, pool: ImageData, transfer_index: torch.Tensor) -> str:
        recipe = asdict(self)
        if recipe["augment"] == "none":  # keys from before the field existed stay valid
            del recipe["augment"]
        payload = json.dumps(
            {"recipe": recipe, "pool": pool.fingerprint(), "transfer": _index_fingerprint(transfer_index), "format": ZOO_FORMAT}, sort_keys=True
        )
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


def _index_fingerprint(index: torch.Tensor) -> str:
    return hashlib.blake2b(index.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest()


# The default zoo: six architectures with their own seeds, private data budgets and epochs, each
# trained to convergence (cosine to zero). Every model has seen the transfer set, as the paper's
# students have seen theirs, so fine-tuning on it teaches them nothing new; each has also seen
# pool images the others have not, which is where a teacher's complementary knowledge comes from.
DEFAULT_ZOO: dict[str, ZooRecipe] = {
    "mlp": ZooRecipe("mlp", seed=1, private_size=10_000),
    "cnn": ZooRecipe("cnn", seed=2, private_size=15_000),
    "resnet": ZooRecipe("resnet", seed=3, private_size=5_000, epochs=5),
    "convnext": ZooRecipe("convnext", seed=4, private_size=10_000),
    "vit": ZooRecipe("vit", seed=5, private_size=15_000, lr=0.02),
    "mixer": ZooRecipe("mixer", seed=6, private_size=10_000, lr=0.02),
}


def zoo_names() -> list[str]:
    return list(DEFAULT_ZOO)


def build(arch: str, num_classes: int = 10) -> torch.nn.Module:
    if arch not in ZOO_ARCHITECTURES:
        raise ModelError(f"unknown zoo architecture {arch!r}; choose one of: {', '.join(ZOO_ARCHITECTURES)}")
    return ZOO_ARCHITECTURES[arch][1](num_classes=num_classes)


def weights_path(name: str, recipe: ZooRecipe, splits: fashion_mnist.FashionMNISTSplits) -> Path:
    return cache_dir() / "zoo" / f"{name}-{recipe.key(splits.pool, splits.transfer_index)}.safetensors"
