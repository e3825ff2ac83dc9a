"""Pretraining the embedded zoo with the engine, once, and the ``zoo:NAME`` model source that loads it.

A zoo model is trained on first use with its recipe (:mod:`ktransfer.models.store`) and cached as
safetensors; a later use reloads the cached weights. This sits above the engine, which it trains
with, and so above :mod:`ktransfer.models`: the models layer knows the recipes and the cache, not
how to train.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from dataclasses import asdict
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .data import fashion_mnist
from .engine import Engine, TrainConfig
from .errors import ModelError
from .methods import create_method
from .models import store
from .models.base import Model
from .models.registry import register_source
from .models.store import ZooRecipe
from .models.zoo import ZOO_ARCHITECTURES
from .paths import atomic_path


def load_zoo_model(
    name: str,
    data_dir=None,
    recipe: ZooRecipe | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Model:
    """The trained zoo model ``name``: from the cache, or trained now (and cached)."""
    if recipe is None:
        if name not in store.DEFAULT_ZOO:
            raise ModelError(f"unknown zoo model {name!r}; the zoo has: {', '.join(store.DEFAULT_ZOO)}")
        recipe = store.DEFAULT_ZOO[name]
    splits = fashion_mnist.load(data_dir)
    family = ZOO_ARCHITECTURES[recipe.arch][0] if recipe.arch in ZOO_ARCHITECTURES else ""
    with torch.random.fork_rng():  # the same weights whatever ran before, and the caller's RNG left alone
        torch.manual_seed(recipe.seed)
        module = store.build(recipe.arch)
    path = store.weights_path(name, recipe, splits)
    if path.is_file():
        try:
            module.load_state_dict(load_file(path))
        except Exception:  # noqa: BLE001 - a damaged or stale file is retrained, never trusted
            path.unlink(missing_ok=True)
            return load_zoo_model(name, data_dir, recipe, on_step)
    else:
        train_zoo_model(module, recipe, splits, on_step)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp, metadata={"recipe": json.dumps(asdict(recipe))})
    module.eval()
    return Model(module, name, store.FASHION_MNIST_PREPROCESS, family, f"zoo:{name}")


def is_cached(name: str, data_dir=None) -> bool:
    """Whether the zoo model ``name``'s weights are in the cache (a load then trains nothing)."""
    return store.weights_path(name, store.DEFAULT_ZOO[name], fashion_mnist.load(data_dir)).is_file()


# How often a zoo model trained in a worker process reports its progress to the driver.
PROGRESS_EVERY = 20


def _train_in_worker(name: str, data_dir, progress) -> None:
    def on_step(step: int, total: int) -> None:
        if step % PROGRESS_EVERY == 0 or step == total:
            progress.put((name, step, total))

    load_zoo_model(name, data_dir, on_step=on_step)


def load_zoo(
    names: list[str],
    data_dir=None,
    pool: Executor | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> dict[str, Model]:
    """The named zoo models, reloaded from the cache or trained now.

    With ``pool`` (worker processes, e.g. one per CPU with one thread each), the models not yet cached
    train there at once, each with its own recipe and seed, as it would alone (up to the rounding of a
    thread count); without it, one after another in this process. ``on_step(name, step, total)``
    reports training progress, ``on_ready(name)`` each model once it is there.
    """
    missing = [name for name in names if name in store.DEFAULT_ZOO and not is_cached(name, data_dir)]
    parallel = pool is not None and len(missing) > 1
    if parallel:
        _train_in_pool(pool, missing, data_dir, on_step, on_ready)
    models = {}
    for name in names:
        step = None
        if on_step is not None and not parallel:  # a model trained here reports its own steps
            step = lambda done, total, name=name: on_step(name, done, total)  # noqa: E731
        models[name] = load_zoo_model(name, data_dir, on_step=step)
        if on_ready is not None and not (parallel and name in missing):  # the pool's were reported as they finished
            on_ready(name)
    return models


def _train_in_pool(pool: Executor, names: list[str], data_dir, on_step, on_ready) -> None:
    import multiprocessing
    import queue

    with multiprocessing.get_context("spawn").Manager() as manager:
        progress = manager.Queue()
        pending = {pool.submit(_train_in_worker, name, None if data_dir is None else str(data_dir), progress): name for name in names}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        name, step, total = progress.get_nowait()
                    except queue.Empty:
                        break
                    if on_step is not None:
                        on_step(name, step, total)
                for future in done:
                    name = pending.pop(future)
                    try:
                        future.result()
                    except Exception as exc:  # the models trained so far stay cached; this one is named
                        raise ModelError(f"training zoo model {name!r} failed: {type(exc).__name__}: {exc}") from exc
                    if on_ready is not None:
                        on_ready(name)
        finally:
            for future in pending:
                future.cancel()


def training_index(recipe: ZooRecipe, pool_size: int, transfer_index: torch.Tensor) -> torch.Tensor:
    """Positions in the pool a zoo model trains on: the transfer set plus its seeded private part of the rest."""
    rest = torch.ones(pool_size, dtype=torch.bool)
    rest[transfer_index] = False
    rest = rest.nonzero().reshape(-1)
    private = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(recipe.seed))[: recipe.private_size]]
    return torch.sort(torch.cat([transfer_index, private])).values


def train_zoo_model(module: torch.nn.Module, recipe: ZooRecipe, splits: fashion_mnist.FashionMNISTSplits, on_step=None) -> None:
    index = training_index(recipe, len(splits.pool), splits.transfer_index)
    data = splits.pool.subset(index, f"{splits.pool.name}[transfer+{recipe.private_size} private, seed={recipe.seed}]")
    config = TrainConfig(
        epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, seed=recipe.seed, schedule=recipe.schedule,
        augment=recipe.augment,
    )
    torch.manual_seed(recipe.seed)
    model = Model(module, recipe.arch, store.FASHION_MNIST_PREPROCESS)
    Engine(model, create_method("ce"), data, config, on_step=on_step).run()


@register_source("zoo")
def _zoo(name: str, **options) -> Model:
    return load_zoo_model(name, data_dir=options.get("data_dir"), on_step=options.get("on_step"))
