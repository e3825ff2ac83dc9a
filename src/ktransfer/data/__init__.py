"""Data sources: the embedded Fashion-MNIST and any labelled images as tensors."""

from .base import ImageData, as_image_data

__all__ = ["ImageData", "as_image_data"]
