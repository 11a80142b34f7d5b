"""Build the convnets from params: architectures are data, this is the one builder.

The default params give the book's MNIST convnet (listing 8.1): three 3x3
convolutions with 32/64/128 filters, max pooling after the first two, Flatten
and a softmax classifier. Its summary shows 320, 18,496, 73,856 and 11,530
parameters. Pixels arrive as uint8; the Rescaling layer in front does the
book's `/ 255` inside the model, so a saved model takes raw images.
"""

from __future__ import annotations

import keras
from keras import layers

from convnets.params import ModelParams


def build_model(params: ModelParams, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for block, filters in enumerate(params.conv_filters):
        x = layers.Conv2D(filters, params.kernel_size, activation="relu")(x)
        if block < params.pooled_blocks:
            x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Flatten()(x)
    if params.dropout:
        x = layers.Dropout(params.dropout)(x)
    if num_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    else:
        outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="convnet")


def loss_for(num_classes: int) -> str:
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
