"""Model specs a user writes anywhere a model is named: each source (``zoo``, ``timm``, ``torchvision``, ``file``, ...) registers here."""

from __future__ import annotations

from typing import Callable

from .base import Model

MODEL_SOURCES: dict[str, Callable[..., Model]] = {}


def register_source(scheme: str):
    def wrap(fn):
        MODEL_SOURCES[scheme] = fn
        return fn

    return wrap
