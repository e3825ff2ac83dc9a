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
    """Resolve a model spec such as ``zoo:cnn``."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ModelError(f"model spec {spec!r} has no source; write it as SOURCE:NAME, e.g. zoo:cnn (sources: {', '.join(MODEL_SOURCES)})")
    if scheme not in MODEL_SOURCES:
        raise ModelError(f"unknown model source {scheme!r} in {spec!r}; known sources: {', '.join(MODEL_SOURCES)}")
    model = MODEL_SOURCES[scheme](rest, **options)
    model.spec = spec
    return model
