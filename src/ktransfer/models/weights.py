"""Weights into modules: read a weights file without running code from it, find and refit the classification layer.

Both the model sources (``?file=``) and the checkpoints load weights through here, so neither
needs the other to do it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError
from .base import final_linear

# Keys under which training scripts commonly nest the model's weights.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, loaded without executing anything from it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not usable safetensors
            raise ModelError(f"{path} is not a readable safetensors file ({exc}); write it again with safetensors.torch.save_file") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"refusing to load {path}: it is a pickle that holds more than tensors ({str(exc).splitlines()[0][:160]}), and unpickling it "
            f"could run arbitrary code. If you trust it, extract its weights once in Python: "
            f"torch.save(torch.load(PATH, weights_only=False).state_dict(), 'weights.pt') (or save them with safetensors)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file at all, ...
        raise ModelError(f"could not read weights from {path} ({type(exc).__name__}: {exc}); expected safetensors or a torch.save file of tensors") from exc
    return _unwrap_state_dict(loaded, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and not all(torch.is_tensor(v) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap_state_dict(obj[key], path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ModelError(f"{path} holds no state dict (a mapping of names to tensors, possibly under one of {', '.join(NESTED_KEYS)}); found {type(obj).__name__}")
    # Weights saved from DataParallel/DDP carry a "module." prefix on every name.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; a classification layer of another size is refitted first."""
    head = classifier_name(module)
    own = module.state_dict()
    weight_key = f"{head}.weight" if head else None
    if weight_key and weight_key in state and weight_key in own and state[weight_key].shape != own[weight_key].shape:
        fit_head(module, int(state[weight_key].shape[0]))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = _state_difference(module.state_dict(), state) or str(exc).splitlines()[-1].strip()
        raise ModelError(f"the weights in {source} do not fit {type(module).__name__} ({detail}); check that the spec names the architecture the weights were trained with") from exc


def _state_difference(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What differs between a module's tensors and a file's, briefly: missing and unexpected names, then shapes."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    reshaped = [f"{key} is {list(given[key].shape)} in the file, {list(own[key].shape)} in the model" for key in own if key in given and given[key].shape != own[key].shape]
    parts = [f"{len(missing)} missing: {some(missing)}" if missing else "", f"{len(unexpected)} unexpected: {some(unexpected)}" if unexpected else "", f"{len(reshaped)} of another shape: {some(reshaped)}" if reshaped else ""]
    return "; ".join(part for part in parts if part)


# ---------------------------------------------------------------------------- heads


def classifier_name(module: nn.Module) -> str | None:
    """Qualified name of the classification layer: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    head = None
    if hasattr(module, "get_classifier"):
        try:
            head = module.get_classifier()
        except Exception:  # noqa: BLE001 - fall back to the generic search
            head = None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        head = final_linear(module)
    if head is None:
        return None
    for name, sub in module.named_modules():
        if sub is head:
            return name
    return None


def classifier(module: nn.Module) -> nn.Module:
    name = classifier_name(module)
    if not name:
        raise ModelError(f"cannot find the classification layer of {type(module).__name__}: it has no get_classifier() and no nn.Linear")
    return module.get_submodule(name)


def fit_head(module: nn.Module, num_classes: int) -> nn.Module:
    """Give ``module`` a freshly initialised classification layer with ``num_classes`` outputs; returns the layer."""
    if hasattr(module, "reset_classifier"):  # timm: knows its own head (pooling, dropout, distillation heads)
        module.reset_classifier(num_classes)
        return classifier(module)
    name = classifier_name(module)
    if not name:
        raise ModelError(f"cannot give {type(module).__name__} a new classification layer: it has no nn.Linear")
    old = module.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ModelError(f"the classification layer {name} of {type(module).__name__} is a {type(old).__name__}, not an nn.Linear; build the model with num_classes instead")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
    if isinstance(getattr(module, "num_classes", None), int):
        module.num_classes = num_classes
    return new


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def is_checkpoint_path(spec: str) -> bool:
    """A bare path to a weights file (no source prefix needed)."""
    path = spec.partition("?")[0]
    return Path(path).suffix in WEIGHT_SUFFIXES or Path(path).expanduser().is_file()
