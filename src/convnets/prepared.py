"""Read the arrays that `preprocess` wrote: NumPy only, so stages that just look at them stay light."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convnets.errors import DataError
from convnets.layout import CLASSES, images_file, labels_file


def load_subset(prepared_dir: str | Path, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images memory-mapped uint8 [n, h, w, c], labels int64 [n])."""
    prepared_dir = Path(prepared_dir)
    images_path = prepared_dir / images_file(subset)
    if not images_path.exists():
        raise DataError(f"{images_path} not found: run the preprocess stage first (dvc repro preprocess)")
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(prepared_dir / labels_file(subset))
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images: every file of the {subset} split was set aside")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {len(labels)} labels: rerun preprocess")
    return images, labels


def load_classes(prepared_dir: str | Path) -> list[str]:
    path = Path(prepared_dir) / CLASSES
    if not path.exists():
        raise DataError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)")
    return json.loads(path.read_text())
