"""The model `train` saves: load it with its class names, and read its outputs as one column per class.

Keras (and TensorFlow behind it) loads only when a model does, so a command
that fails on its arguments first answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convnets.errors import DataError
from convnets.layout import CLASSES, MODEL_FILE

if TYPE_CHECKING:
    import keras


def load_trained(model_dir: str | Path) -> tuple[keras.Model, list[str]]:
    """(model, class names) from the folder the train stage wrote; DataError if they do not fit."""
    import keras

    from convnets.pretrained import VGG16Preprocess  # noqa: F401  (registers the layer a VGG16 model uses)

    model_dir = Path(model_dir)
    model_path, classes_path = model_dir / MODEL_FILE, model_dir / CLASSES
    for path in (model_path, classes_path):
        if not path.is_file():
            raise DataError(f"{path} not found: run the train stage first (dvc repro train), or give the folder it wrote")
    model = keras.models.load_model(model_path)
    classes = json.loads(classes_path.read_text())
    outputs = model.output_shape[-1]
    if (outputs == 1 and len(classes) != 2) or (outputs > 1 and outputs != len(classes)):
        raise DataError(f"{model_dir}: the model has {outputs} output(s) but {CLASSES} names {len(classes)} classes")
    return model, classes


def class_columns(probs: np.ndarray) -> np.ndarray:
    """Probabilities [n, classes] in float64; a sigmoid's one column p(1) becomes (p(0), p(1))."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 1:
        probs = np.hstack([1.0 - probs, probs])
    return probs
