"""Build the convnets from params: architectures are data, this is the one builder.

Every preset of conf/model/ is made here:

- the book's MNIST convnet (listing 8.1, the default params): three 3x3
  convolutions with 32/64/128 filters, max pooling after the first two, Flatten
  and a softmax classifier; its summary shows 320, 18,496, 73,856 and 11,530
  parameters;
- the dogs-vs-cats convnets from scratch (plain blocks, chapter 8; residual
  separable blocks with BatchNorm, chapter 9), with or without the book's
  augmentation layers and Dropout;
- a frozen VGG16 base with a dense classifier on top (feature extraction,
  fine-tuning).

Pixels arrive as uint8; the Rescaling layer (or VGG16's preprocess_input) in
front does the scaling inside the model, so a saved model takes raw images.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from convnets.params import AugmentationParams, ModelParams
from convnets.pretrained import VGG16Preprocess, vgg16_base


@dataclass
class Convnet:
    """The model to train and save, and its parts when it has a pretrained base.

    With a base, `model` is inputs -> [augmentation] -> preprocess -> base ->
    classifier, where `base` and `classifier` are the very same layer objects, so
    training `classifier` alone on cached base outputs trains `model` too.
    """

    model: keras.Model
    base: keras.Model | None = None
    classifier: keras.Model | None = None


def build_model(params: ModelParams, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    return build_convnet(params, input_shape, num_classes).model


def build_convnet(params: ModelParams, input_shape: tuple[int, int, int], num_classes: int) -> Convnet:
    if params.base == "vgg16":
        return _pretrained_convnet(params, tuple(input_shape), num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = augmentation(inputs, params.augmentation)
    x = layers.Rescaling(1.0 / 255)(x)
    if params.block == "residual":
        x = residual_blocks(x, params)
    else:
        x = plain_blocks(x, params)
    outputs = classifier_head(x, params, num_classes)
    return Convnet(keras.Model(inputs, outputs, name="convnet"))


def _pretrained_convnet(params: ModelParams, input_shape: tuple[int, int, int], num_classes: int) -> Convnet:
    base = vgg16_base(input_shape, params.weights)
    base.trainable = False  # train.py unfreezes the last layers for fine-tuning
    features = keras.Input(shape=base.output.shape[1:], name="features")
    classifier = keras.Model(features, classifier_head(features, params, num_classes), name="classifier")
    inputs = keras.Input(shape=input_shape, name="image")
    x = augmentation(inputs, params.augmentation)
    x = VGG16Preprocess(name="vgg16_preprocess")(x)
    # training=False keeps the base in inference mode even while its last layers are
    # fine-tuned (the Keras transfer-learning rule; it matters for bases with BatchNorm).
    x = base(x, training=False)
    return Convnet(keras.Model(inputs, classifier(x), name="convnet"), base, classifier)


def augmentation(x, params: AugmentationParams):
    """The book's data augmentation, and shifts and contrast; the layers are no-ops outside training."""
    if params.flip != "none":
        x = layers.RandomFlip(params.flip)(x)
    if params.rotation:
        x = layers.RandomRotation(params.rotation)(x)
    if params.zoom:
        x = layers.RandomZoom(params.zoom)(x)
    if params.translation:
        x = layers.RandomTranslation(params.translation, params.translation)(x)
    if params.contrast:
        # Before Rescaling: the pixels still span 0-255, RandomContrast's default value_range.
        # A pair: from one number c Keras 3.15 draws the factor from [1, 1 + c] only.
        x = layers.RandomContrast((params.contrast, params.contrast))(x)
    return x


def plain_blocks(x, params: ModelParams):
    """Chapter 8: Conv2D + ReLU, MaxPooling2D after the first `pooled_blocks`."""
    for block, filters in enumerate(params.conv_filters):
        x = layers.Conv2D(filters, params.kernel_size, activation="relu")(x)
        if block < params.pooled_blocks:
            x = layers.MaxPooling2D(pool_size=2)(x)
    return x


def residual_blocks(x, params: ModelParams):
    """Chapter 9's mini-Xception: BatchNorm, ReLU, SeparableConv2D twice, with a residual shortcut."""
    if params.stem_filters:
        x = layers.Conv2D(params.stem_filters, 5, strides=params.stem_strides, padding="same", use_bias=False)(x)
    for block, filters in enumerate(params.conv_filters):
        residual = x
        for _ in range(2):
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
            x = layers.SeparableConv2D(filters, params.kernel_size, padding="same", use_bias=False)(x)
        pooled = block < params.pooled_blocks
        if pooled:
            x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        if pooled or residual.shape[-1] != filters:
            # A 1x1 convolution gives the shortcut the block's shape.
            residual = layers.Conv2D(filters, 1, strides=2 if pooled else 1, padding="same", use_bias=False)(residual)
        x = layers.add([x, residual])
    return x


def classifier_head(x, params: ModelParams, num_classes: int):
    x = layers.Flatten()(x) if params.pooling == "flatten" else layers.GlobalAveragePooling2D()(x)
    for units in params.dense_units:
        x = layers.Dense(units, activation="relu")(x)
    if params.dropout:
        x = layers.Dropout(params.dropout)(x)
    # float32 outputs even under mixed precision: a float16 sigmoid/softmax
    # loses the small probabilities the loss needs.
    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", name="probability", dtype="float32")(x)
    return layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)


def loss_for(num_classes: int, label_smoothing: float = 0.0, one_hot: bool = False) -> str | keras.losses.Loss:
    """Cross-entropy for the model's output; `one_hot`: the labels arrive one-hot (or soft) per class.

    Keras 3's SparseCategoricalCrossentropy takes no label_smoothing, so smoothing
    more than two classes needs one-hot labels (see one_hot_classes).
    """
    if num_classes == 2:
        if label_smoothing:
            return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        return "binary_crossentropy"
    if one_hot:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError("label smoothing of more than two classes needs one-hot labels")
    return "sparse_categorical_crossentropy"


def one_hot_classes(num_classes: int, label_smoothing: float, mixup: float) -> int:
    """How many classes to one-hot encode the labels into; 0 keeps the integer labels.

    Soft targets of more than two classes (smoothed, or blended by MixUp) need a
    probability per class. Two classes have one sigmoid output whose target is
    already a probability, so their labels stay as they are.
    """
    return num_classes if num_classes > 2 and (label_smoothing or mixup) else 0
