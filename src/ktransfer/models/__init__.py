"""Models and their sources: timm, torchvision, Python factories and checkpoints here; the embedded zoo's source is
registered by :mod:`ktransfer.pretrain`, which trains it with the engine (a layer above this one)."""

from . import checkpoint, hf  # noqa: F401  (register the file source, checkpoints that record their architecture, and hf:)
from .base import Model, Preprocess, as_model
from .loading import load_model
from .registry import register_source

__all__ = ["Model", "Preprocess", "as_model", "load_model", "register_source"]
