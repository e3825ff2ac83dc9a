"""Model specs a user writes anywhere a model is named: ``zoo:NAME`` (more sources register here)."""

from __future__ import annotations

from typing import Callable

from ..errors import ModelError
from .base import Model

MODEL_SOURCES: dict[str, Callable[..., Model]] = {}


def register_source(scheme: str):
    def wrap(fn):
        MODEL_SOURCES[scheme] = fn
        return fn

    return wrap


@register_source("zoo")
def _zoo(name: str, **options) -> Model:
    from .store import load_zoo_model

    return load_zoo_model(name, data_dir=options.get("data_dir"), on_step=options.get("on_step"))


def load_model(spec: str, **options) -> Model:
    """Resolve a model spec: ``zoo:cnn``, ``timm:NAME``, ``torchvision:NAME``, ``package.module:factory``,
    or the path of a checkpoint that records its architecture (see ``models/sources.py``)."""
    from .checkpoint import is_checkpoint_path
    from .sources import PYTHON_MODULE

    scheme, sep, rest = spec.partition(":")
    if sep and scheme in MODEL_SOURCES:
        model = MODEL_SOURCES[scheme](rest, **options)
    elif is_checkpoint_path(spec):
        model = MODEL_SOURCES["file"](spec, **options)
    elif sep and rest and PYTHON_MODULE.fullmatch(scheme):  # package.module:factory; its "scheme" is a module path
        model = MODEL_SOURCES["python"](spec, **options)
    elif not sep:
        raise ModelError(
            f"model spec {spec!r} has no source and is no file; write it as SOURCE:NAME, e.g. zoo:cnn, timm:resnet50, "
            f"package.module:factory, or give the path of a checkpoint (sources: {', '.join(MODEL_SOURCES)})"
        )
    else:
        raise ModelError(f"unknown model source {scheme!r} in {spec!r}; known sources: {', '.join(MODEL_SOURCES)}, or package.module:factory")
    model.spec = spec
    return model


from . import checkpoint, sources  # noqa: E402,F401  (register the timm, torchvision, python and file sources)
