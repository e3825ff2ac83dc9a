"""Resolve a model spec to a model, through every registered source."""

from __future__ import annotations

from ..errors import ModelError
from . import sources  # noqa: F401  (registers the timm, torchvision and python sources)
from .base import Model
from .registry import MODEL_SOURCES
from .sources import PYTHON_MODULE
from .weights import is_checkpoint_path


def load_model(spec: str, **options) -> Model:
    """Resolve a model spec: ``zoo:cnn``, ``timm:NAME``, ``torchvision:NAME``, ``package.module:factory``,
    or the path of a checkpoint that records its architecture (see ``models/sources.py``)."""
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
            f"package.module:factory, or give the path of a checkpoint (sources: {', '.join(sorted(MODEL_SOURCES))})"
        )
    else:
        raise ModelError(f"unknown model source {scheme!r} in {spec!r}; known sources: {', '.join(sorted(MODEL_SOURCES))}, or package.module:factory")
    model.spec = spec
    return model
