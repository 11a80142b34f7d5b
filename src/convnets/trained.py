"""The model `train` saves: write it byte-reproducibly, load it with its class names, read its outputs.

Keras (and TensorFlow behind it) loads only when a model does, so a command
that fails on its arguments first answers at once.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from convnets.errors import DataError
from convnets.layout import CLASSES, MODEL_FILE
from convnets.outputs import atomic_file

if TYPE_CHECKING:
    import keras

# What zip entries are dated with: the earliest date a zip can hold (as reproducible builds use).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_model(model: keras.Model, path: str | Path) -> None:
    """model.save, with bytes that depend only on the architecture and the weights.

    A .keras file is a zip of config.json, model.weights.h5 and metadata.json.
    Keras dates the weights entry with the clock, writes the save time into
    metadata.json, and numbers objects that layers share (their dtype policy) in
    config.json by their address in memory. All three are rewritten here: entries
    dated ZIP_EPOCH, no save time, shared objects numbered 1, 2, ... in order.
    """
    path = Path(path)
    model.save(path)
    with zipfile.ZipFile(path) as saved:
        entries = [(info, saved.read(info)) for info in saved.infolist()]
    with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w") as out:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber_shared_objects(json.loads(data), {})).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            out.writestr(fixed, data)


def renumber_shared_objects(node, numbers: dict[int, int]):
    """The config with each `shared_object_id` (an id() in the saving process) replaced by 1, 2, ..."""
    if isinstance(node, dict):
        renumbered = {key: renumber_shared_objects(value, numbers) for key, value in node.items()}
        if "shared_object_id" in node:
            renumbered["shared_object_id"] = numbers.setdefault(node["shared_object_id"], len(numbers) + 1)
        return renumbered
    if isinstance(node, list):
        return [renumber_shared_objects(item, numbers) for item in node]
    return node


def load_trained(model_dir: str | Path) -> tuple[keras.Model, list[str]]:
    """(model, class names) from the folder the train stage wrote; DataError if they do not fit."""
    import keras

    from convnets.pretrained import VGG16Preprocess  # noqa: F401  (registers the layer a VGG16 model uses)

    model_dir = Path(model_dir)
    model_path, classes_path = model_dir / MODEL_FILE, model_dir / CLASSES
    for path in (model_path, classes_path):
        if not path.is_file():
            raise DataError(
                f"{path} not found: run the train stage first (dvc repro train), or give the folder it wrote"
            )
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
