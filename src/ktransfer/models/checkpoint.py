"""Weights on disk: read them safely, write them with the architecture they belong to.

Reading never runs code from the file: safetensors, or ``torch.load(weights_only=True)``, which
accepts tensors and plain containers only. A pickle that needs more (a whole pickled model, an
optimiser with custom classes, or a malicious payload) is refused with an explanation.

A checkpoint written by ktransfer (``ktransfer adapt``, :func:`save_checkpoint`) records in its
safetensors metadata the spec that builds its architecture, its class count and names, and the
preprocessing, so its path alone is a model spec. A student saved by ``ktransfer transfer``
records the student's spec, which serves the same purpose.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelError
from ..paths import atomic_path
from .base import Model, Preprocess
from .registry import register_source
from .sources import apply_preprocess_options, architecture_spec, split_options
from .weights import WEIGHT_SUFFIXES, is_checkpoint_path, load_weights, read_state_dict  # noqa: F401  (part of this module's interface)

METADATA_KEY = "ktransfer.model"


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path} is not a readable safetensors file ({exc})") from exc


def checkpoint_info(model: Model, class_names: list[str] | None = None, **extra) -> dict:
    """What a checkpoint records so that its path alone rebuilds the model."""
    architecture = model.architecture or architecture_spec(model.spec)
    if not architecture:
        raise ModelError(f"{model.name}: cannot record its architecture (it has no spec); load it through a model spec to save it as a checkpoint")
    return {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "class_names": list(class_names) if class_names is not None else model.class_names,
        "preprocess": dataclasses.asdict(model.preprocess),
        "name": model.name,
        "family": model.family,
        **extra,
    }


def save_checkpoint(model: Model, path: str | Path, class_names: list[str] | None = None, **extra) -> Path:
    """Write the weights as safetensors with everything :func:`load_checkpoint` needs."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"checkpoints are written as safetensors; name the file *.safetensors (got {path.name})")
    info = checkpoint_info(model, class_names, **extra)
    # clone(): safetensors refuses tensors that share storage (tied weights)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={METADATA_KEY: json.dumps(info)})
    return path


def _build_architecture(spec: str) -> Model:
    scheme, _, name = spec.partition(":")
    if scheme == "zoo":  # the zoo's weights would be trained on first use; the checkpoint brings its own
        from .store import DEFAULT_ZOO, FASHION_MNIST_PREPROCESS, build
        from .zoo import ZOO_ARCHITECTURES

        arch = DEFAULT_ZOO[name].arch if name in DEFAULT_ZOO else name
        if arch not in ZOO_ARCHITECTURES:
            raise ModelError(f"unknown zoo architecture {name!r} recorded in the checkpoint")
        return Model(build(arch), name, FASHION_MNIST_PREPROCESS, ZOO_ARCHITECTURES[arch][0], spec)
    from .loading import load_model  # here, not at the top: the file source is registered when the package loads this module

    return load_model(spec)


def load_checkpoint(path: str | Path, **overrides) -> Model:
    """A model from a checkpoint that records its architecture (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    metadata = read_metadata(path)
    if METADATA_KEY in metadata:
        info = json.loads(metadata[METADATA_KEY])
    elif metadata.get("student") not in (None, "", "None"):  # a student saved by `ktransfer transfer`
        info = {"architecture": metadata["student"]}
    else:
        raise ModelError(
            f"{path} does not record which architecture it holds; name the architecture and point it at the file, "
            f"e.g. timm:NAME?file={path}, torchvision:NAME?file={path} or package.module:factory?file={path}"
        )
    architecture = info["architecture"]
    # A student of a transfer may itself come from a checkpoint: that file rebuilds the architecture.
    model = load_checkpoint(architecture) if is_checkpoint_path(architecture) else _build_architecture(architecture_spec(architecture))
    load_weights(model.module, read_state_dict(path), str(path))
    model.module.eval()
    preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocess"].items()}) if info.get("preprocess") else model.preprocess
    model.preprocess = apply_preprocess_options(preprocess, overrides, str(path))
    model.name = info.get("name") or path.stem
    model.family = info.get("family") or model.family
    model.architecture = model.architecture or architecture_spec(architecture)
    model.class_names = info.get("class_names")
    model._fingerprint = None
    return model


@register_source("file")
def file_model(rest: str, **_) -> Model:
    """``file:PATH`` (or a bare PATH): a checkpoint that records its architecture."""
    path, options = split_options(rest, f"file:{rest}")
    return load_checkpoint(path, **options)
