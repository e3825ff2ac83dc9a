"""Weight soups: the uniform average of students of one architecture, and batch-norm statistics
recomputed on data afterwards (the ``soup`` strategy of :mod:`ktransfer.multi`)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .data.base import ImageData
from .errors import ConfigError, ModelError
from .models.base import Model


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of floating-point entries; integer entries (BN's ``num_batches_tracked``) come from the first."""
    if not states:
        raise ConfigError("a weight soup needs at least one ingredient")
    first = states[0]
    for number, state in enumerate(states[1:], 2):
        if state.keys() != first.keys():
            missing, extra = sorted(first.keys() - state.keys()), sorted(state.keys() - first.keys())
            raise ModelError(
                f"soup ingredient {number} has different parameters from ingredient 1 (missing: {', '.join(missing[:3]) or 'none'}; "
                f"extra: {', '.join(extra[:3]) or 'none'}); a weight soup needs students of one architecture"
            )
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ModelError(f"soup ingredient {number}: {key} has shape {tuple(tensor.shape)} but {tuple(first[key].shape)} in ingredient 1; a weight soup needs students of one architecture")
    averaged = {}
    for key, tensor in first.items():
        if tensor.is_floating_point() or tensor.is_complex():
            # Average in at least float32 so half-precision weights do not lose the small differences.
            wide = torch.promote_types(tensor.dtype, torch.float32)
            averaged[key] = torch.stack([state[key].detach().to(wide) for state in states]).mean(dim=0).to(tensor.dtype)
        else:
            averaged[key] = tensor.detach().clone()
    return averaged


def average_weights(modules: Sequence[nn.Module]) -> nn.Module:
    """A new module whose parameters and float buffers are the uniform average of ``modules`` (left untouched)."""
    if not modules:
        raise ConfigError("a weight soup needs at least one ingredient")
    kinds = {type(module) for module in modules}
    if len(kinds) > 1:
        raise ModelError(f"a weight soup needs students of one architecture; got {', '.join(sorted(k.__name__ for k in kinds))}")
    soup = copy.deepcopy(modules[0])
    soup.load_state_dict(average_state_dicts([module.state_dict() for module in modules]))
    return soup


def batch_norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: Model, data: ImageData, batch_size: int = 256, device: str | torch.device = "cpu") -> int:
    """Recompute every batch-norm layer's running statistics on ``data``; returns how many layers there were.

    Averaged weights no longer match the averaged statistics, so the statistics are reset and
    re-estimated as a cumulative average over the batches (momentum ``None``), with the rest of
    the network in eval mode (no dropout) and no gradients. Parameters and all other buffers stay
    as they were; modes and momenta are restored afterwards.
    """
    module = model.module
    norms = batch_norm_layers(module)
    if not norms:
        return 0
    modes = {sub: sub.training for sub in module.modules()}
    momenta = [norm.momentum for norm in norms]
    try:
        module.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for _, images, _ in data.batches(torch.arange(len(data)), batch_size):
            model.logits(images.to(device, non_blocking=True))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for sub, training in modes.items():
            sub.train(training)
    return len(norms)


# ---------------------------------------------------------------- shared set-up
