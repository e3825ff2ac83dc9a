"""Training the embedded zoo once and reloading it: weights cached as safetensors.

A zoo model is an architecture plus a recipe (its seeded subset of the pretraining pool and
its training settings). The cache key covers the recipe and the pool's content, so a change
of either retrains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..data import fashion_mnist
from ..data.base import ImageData
from ..errors import ModelError
from ..paths import cache_dir
from .base import Model, Preprocess
from .zoo import ZOO_ARCHITECTURES

ZOO_FORMAT = 2  # bump when architectures change: old weights are then retrained, not misloaded
FASHION_MNIST_PREPROCESS = Preprocess(mean=(fashion_mnist.MEAN,), std=(fashion_mnist.STD,), input_size=(28, 28), in_chans=1)


@dataclass(frozen=True)
class ZooRecipe:
    arch: str
    seed: int
    subset_size: int = 15_000
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4

    def key(self, pool: ImageData) -> str:
        payload = json.dumps({"recipe": asdict(self), "pool": pool.fingerprint(), "format": ZOO_FORMAT}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


# The default zoo: short training on small subsets, so that accuracies spread out.
DEFAULT_ZOO: dict[str, ZooRecipe] = {
    "mlp": ZooRecipe("mlp", seed=1, epochs=2, lr=0.02),
    "cnn": ZooRecipe("cnn", seed=2, epochs=4),
    "resnet": ZooRecipe("resnet", seed=3, epochs=2),
    "convnext": ZooRecipe("convnext", seed=4, epochs=4),
    "vit": ZooRecipe("vit", seed=5, epochs=3, lr=0.02),
    "mixer": ZooRecipe("mixer", seed=6, epochs=2, lr=0.02),
}


def zoo_names() -> list[str]:
    return list(DEFAULT_ZOO)


def build(arch: str, num_classes: int = 10) -> torch.nn.Module:
    if arch not in ZOO_ARCHITECTURES:
        raise ModelError(f"unknown zoo architecture {arch!r}; choose one of: {', '.join(ZOO_ARCHITECTURES)}")
    return ZOO_ARCHITECTURES[arch][1](num_classes=num_classes)


def weights_path(name: str, recipe: ZooRecipe, pool: ImageData) -> Path:
    return cache_dir() / "zoo" / f"{name}-{recipe.key(pool)}.safetensors"


def load_zoo_model(
    name: str,
    data_dir=None,
    recipe: ZooRecipe | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Model:
    """The trained zoo model ``name``: from the cache, or trained now (and cached)."""
    if recipe is None:
        if name not in DEFAULT_ZOO:
            raise ModelError(f"unknown zoo model {name!r}; the zoo has: {', '.join(DEFAULT_ZOO)}")
        recipe = DEFAULT_ZOO[name]
    splits = fashion_mnist.load(data_dir)
    family = ZOO_ARCHITECTURES[recipe.arch][0] if recipe.arch in ZOO_ARCHITECTURES else ""
    with torch.random.fork_rng():  # the same weights whatever ran before, and the caller's RNG left alone
        torch.manual_seed(recipe.seed)
        module = build(recipe.arch)
    path = weights_path(name, recipe, splits.pool)
    if path.is_file():
        try:
            module.load_state_dict(load_file(path))
        except Exception:  # noqa: BLE001 - a damaged or stale file is retrained, never trusted
            path.unlink(missing_ok=True)
            return load_zoo_model(name, data_dir, recipe, on_step)
    else:
        train_zoo_model(module, recipe, splits.pool, on_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp, metadata={"recipe": json.dumps(asdict(recipe))})
        tmp.replace(path)
    module.eval()
    return Model(module, name, FASHION_MNIST_PREPROCESS, family, f"zoo:{name}")


def train_zoo_model(module: torch.nn.Module, recipe: ZooRecipe, pool: ImageData, on_step=None) -> None:
    from ..engine import Engine, TrainConfig
    from ..methods import create_method

    subset = torch.randperm(len(pool), generator=torch.Generator().manual_seed(recipe.seed))[: recipe.subset_size]
    data = pool.subset(subset, f"{pool.name}[seed={recipe.seed},n={recipe.subset_size}]")
    config = TrainConfig(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, seed=recipe.seed)
    torch.manual_seed(recipe.seed)
    model = Model(module, recipe.arch, FASHION_MNIST_PREPROCESS)
    Engine(model, create_method("ce"), data, config, on_step=on_step).run()
