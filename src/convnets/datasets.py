"""Read the arrays that `preprocess` wrote, for training, evaluation and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convnets.errors import DataError
from convnets.preprocess import CLASSES


def load_subset(prepared_dir: str | Path, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images memory-mapped uint8 [n, h, w, c], labels int64 [n])."""
    prepared_dir = Path(prepared_dir)
    images_path = prepared_dir / f"{subset}_images.npy"
    if not images_path.exists():
        raise DataError(f"{images_path} not found: run the preprocess stage first (dvc repro preprocess)")
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(prepared_dir / f"{subset}_labels.npy")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images: every file of the {subset} split was set aside")
    return images, labels


def load_classes(prepared_dir: str | Path) -> list[str]:
    return json.loads((Path(prepared_dir) / CLASSES).read_text())
