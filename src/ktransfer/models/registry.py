"""Model specs a user writes anywhere a model is named: ``zoo:NAME`` (more sources register here)."""

from __future__ import annotations

from typing import Callable

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
