"""Datasets: the :class:`ImageDataset` type and the loaders that produce it."""
from __future__ import annotations

from .base import ImageDataset
from .loaders import (
    load_dataset,
    load_digits8,
    load_image_folder,
    load_mnist5k,
    load_mnist32,
    load_mnist256,
    load_npz,
)

__all__ = [
    "ImageDataset",
    "load_digits8",
    "load_mnist5k",
    "load_npz",
    "load_image_folder",
    "load_mnist32",
    "load_mnist256",
    "load_dataset",
]
