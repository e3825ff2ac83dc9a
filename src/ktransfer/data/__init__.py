"""Data sources: the embedded Fashion-MNIST, image folders, Hugging Face datasets and any labelled images as tensors."""

from . import hf_datasets  # noqa: F401  (registers datasets.Dataset with as_image_data)
from .base import ImageData, as_image_data

__all__ = ["ImageData", "as_image_data"]
