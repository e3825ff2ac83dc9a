"""Model sources: the embedded zoo (and, through the registry, more)."""

from .base import Model, Preprocess, as_model
from .loading import load_model
from .registry import register_source

__all__ = ["Model", "Preprocess", "as_model", "load_model", "register_source"]
