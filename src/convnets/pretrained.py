"""The ImageNet-pretrained convolutional base of the book's feature extraction and fine-tuning.

`model.weights` in params says where VGG16's weights come from:

- `imagenet`: Keras's own file, downloaded once into ~/.keras/models/ (or
  $KERAS_HOME/models/) and checked against its published hash;
- `none`: random weights (tests build the same graph without the download);
- anything else: the path of a local weights file, for machines that cannot
  reach the download (copy the file there by hand).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from convnets.errors import DataError

WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/vgg16/{WEIGHTS_FILE}"
WEIGHTS_MD5 = "6d6bbae143d832006294945121d1f1fc"  # the hash keras.applications.VGG16 checks


@keras.saving.register_keras_serializable(package="convnets")
class VGG16Preprocess(keras.layers.Layer):
    """keras.applications.vgg16.preprocess_input as a layer: RGB -> BGR, minus the ImageNet mean.

    A layer (not a Lambda) so that a saved model carries it and reloads without
    custom code beyond importing this module.
    """

    def call(self, inputs):
        return keras.applications.vgg16.preprocess_input(keras.ops.cast(inputs, self.compute_dtype))


def keras_home() -> Path:
    """Keras's folder for downloads: $KERAS_HOME, else ~/.keras (as Keras itself decides)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def keras_models_dir() -> Path:
    return keras_home() / "models"


def imagenet_weights_path() -> Path:
    """The VGG16 no-top weights file: from Keras's cache, downloading it there if needed."""
    home = keras_home()
    # get_file silently falls back to /tmp/.keras when the folder does not exist yet.
    home.mkdir(parents=True, exist_ok=True)
    try:
        path = keras.utils.get_file(
            WEIGHTS_FILE, WEIGHTS_URL, cache_dir=str(home), cache_subdir="models", file_hash=WEIGHTS_MD5
        )
        return Path(path)
    except Exception as exc:  # get_file raises a bare Exception for network errors
        raise DataError(
            f"could not download the VGG16 ImageNet weights ({exc}). Fetch {WEIGHTS_URL} "
            f"on a machine with internet access and either put it at {keras_models_dir() / WEIGHTS_FILE} "
            f"or set model.weights to the file's path"
        ) from None


def vgg16_base(input_shape: tuple[int, int, int], weights: str) -> keras.Model:
    """VGG16's convolutional base (no classifier) with the weights params name."""
    if input_shape[-1] != 3:
        raise DataError(f"VGG16 needs RGB images, got {input_shape[-1]} channel(s): set preprocess.channels: 3")
    if min(input_shape[:2]) < 32:
        raise DataError(f"VGG16 needs images of at least 32 x 32 pixels, got {input_shape[0]} x {input_shape[1]}")
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=tuple(input_shape))
    if weights == "none":
        return base
    path = imagenet_weights_path() if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise DataError(
            f"model.weights: {path} not found. Give the path of {WEIGHTS_FILE} "
            f"(from {WEIGHTS_URL}), or 'imagenet' to download it"
        )
    try:
        base.load_weights(path)
    except Exception as exc:  # h5py/Keras raise many types for a wrong or damaged file
        raise DataError(f"model.weights: cannot load VGG16 weights from {path}: {exc}") from None
    return base


def set_trainable_layers(base: keras.Model, count: int) -> None:
    """Freeze the base except its last `count` layers (the book's fine-tuning: 4 = block 5).

    Call compile() afterwards: Keras reads `trainable` when it compiles.
    """
    base.trainable = count > 0
    for index, layer in enumerate(base.layers):
        layer.trainable = count > 0 and index >= len(base.layers) - count
