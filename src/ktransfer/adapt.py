"""Fit a pretrained model to a new dataset's classes (paper appendix B.4, B.5) before any transfer.

A linear probe trains only the classification layer, with the rest of the network frozen in
eval mode (batch-norm statistics and dropout as they were); ``full=True`` fine-tunes everything.
Training runs on the one engine with the cross-entropy method. The result saves as a checkpoint
whose path is a model spec every command takes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data.base import as_image_data
from .engine import Engine, Evaluator, TrainConfig
from .errors import ConfigError
from .methods import create_method
from .models.base import Model, as_model
from .models.checkpoint import save_checkpoint
from .models.sources import architecture_spec, classifier, fit_head

DEFAULT_LR = {"probe": 1e-2, "full": 1e-3}


class _FrozenBackbone(nn.Module):
    """Wraps a model for a linear probe: ``train()`` reaches only the head; the backbone stays in eval mode."""

    def __init__(self, module: nn.Module, head: nn.Module):
        super().__init__()
        self.inner = module
        self._head = [head]  # a list, so the head is not registered a second time

    def train(self, mode: bool = True):
        self.training = mode
        self.inner.eval()
        self._head[0].train(mode)
        return self

    def forward(self, x):
        return self.inner(x)


@dataclass
class AdaptResult:
    model: Model
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """The adapted model as a checkpoint; its path then works as a model spec (``--student PATH``)."""
        return save_checkpoint(self.model, path, self.model.class_names, adapted=self.metrics)


def adapt(
    model,
    train_data,
    eval_data=None,
    *,
    full: bool = False,
    new_head: bool | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    device: str = "cpu",
    class_names: list[str] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> AdaptResult:
    """A copy of ``model`` fitted to ``train_data``'s classes; ``model`` itself is left untouched.

    ``new_head``: a freshly initialised classification layer (default: when the class count differs
    from the model's; for the same classes in a new domain, the existing layer is fine-tuned).
    ``eval_data`` (optional) is scored after every epoch.
    """
    started = time.perf_counter()
    source = as_model(model, "model")
    train_set = as_image_data(train_data, "adapt data", class_names)
    eval_set = as_image_data(eval_data, "adapt eval data", class_names) if eval_data is not None else None
    if eval_set is not None and list(eval_set.class_names) != list(train_set.class_names):
        raise ConfigError(f"{train_set.name} and {eval_set.name} have different classes; adapt on one label space")
    num_classes = train_set.num_classes
    module = copy.deepcopy(source.module)
    torch.manual_seed(seed)  # the new head's initialisation is part of the run
    replaced = new_head if new_head is not None else source.num_classes != num_classes
    head = fit_head(module, num_classes) if replaced else classifier(module)
    if full:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
        trainable = module
    else:
        head_params = {id(p) for p in head.parameters()}
        for parameter in module.parameters():
            parameter.requires_grad_(id(parameter) in head_params)
        trainable = _FrozenBackbone(module, head)
    mode = "full" if full else "probe"
    config = TrainConfig(epochs=epochs, lr=lr if lr is not None else DEFAULT_LR[mode], batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed, device=device)
    config.validate()
    trainable.to(device)
    training = source.rebuilt(trainable)
    evaluator = Evaluator(eval_set, batch_size=config.eval_batch_size, device=device) if eval_set is not None else None
    history = Engine(training, create_method("ce"), train_set, config, evaluator=evaluator, on_epoch=on_epoch).run()
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    module.eval()

    architecture = source.architecture or (architecture_spec(source.spec) if source.spec else None)
    adapted = source.rebuilt(module, architecture=architecture, class_names=list(train_set.class_names))
    metrics = {
        "from": source.spec or source.name,
        "mode": mode,
        "new_head": bool(replaced),
        "num_classes": num_classes,
        "train_data": train_set.name,
        "n_train": len(train_set),
        "eval_data": eval_set.name if eval_set is not None else None,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": seed,
        "train_loss": history[-1].get("train_loss"),
        "acc": history[-1].get("acc"),
        "seconds": time.perf_counter() - started,
    }
    return AdaptResult(adapted, history, metrics)


__all__ = ["AdaptResult", "adapt"]
