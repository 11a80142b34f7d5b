"""Feed the arrays that `preprocess` wrote to Keras through tf.data.

The prepared images are memory-mapped uint8 .npy files. The input pipeline
streams them in chunks into a tf.data cache (RAM) on the first pass, so later
epochs never touch Python or the disk: the model, not the input, is the
bottleneck. Shuffling is keyed by the epoch number (seed, epoch), and MixUp
by (seed, epoch, batch), so the batches of epoch 7 are the same whether a run
went straight through or was killed after epoch 6 and resumed.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# Rows copied from the memmap per step of the generator: big enough to keep the
# Python overhead negligible, small enough to bound the memory of the copy.
CHUNK_ROWS = 256


def stream(images: np.ndarray, labels: np.ndarray | None = None) -> tf.data.Dataset:
    """Unbatched elements (image[, label]) read from a (memory-mapped) array in chunks.

    A generator rather than from_tensor_slices: the latter copies the whole array
    into one graph constant, which breaks past 2 GB (the full Kaggle set) and
    when a distribution strategy serializes the pipeline.
    """
    n = len(images)

    def chunks():
        for start in range(0, n, CHUNK_ROWS):
            block = np.ascontiguousarray(images[start : start + CHUNK_ROWS])
            yield block if labels is None else (block, labels[start : start + CHUNK_ROWS])

    image_spec = tf.TensorSpec((None, *images.shape[1:]), tf.as_dtype(images.dtype))
    signature = image_spec if labels is None else (image_spec, tf.TensorSpec((None,), tf.as_dtype(labels.dtype)))
    elements = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()
    # A known length lets Keras count the batches instead of running into the end of the data.
    return elements.apply(tf.data.experimental.assert_cardinality(n))


def training_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    classes: int = 0,
    mixup: float = 0.0,
) -> tuple[tf.data.Dataset, int]:
    """Shuffled batches for epochs [first_epoch, epochs), one after the other; and steps per epoch.

    Give Keras the steps per epoch: it then keeps one iterator over the whole
    stream, which is what lets the shuffle order depend on the epoch number.
    `classes` > 0 one-hot encodes the labels; `mixup` > 0 blends each batch (mix_pairs).
    """
    cached = stream(images, labels).cache()
    n = len(labels)

    def one_epoch(epoch):
        # Epoch e is shuffled with seed + e (as PyTorch's DistributedSampler.set_epoch
        # does): a fresh order every epoch, the same order for epoch e in a resumed run.
        shuffled = cached.shuffle(n, seed=seed + epoch, reshuffle_each_iteration=False)
        batches = one_hot(shuffled.batch(batch_size), classes)
        if mixup:
            # Batch b of epoch e draws its blend with the stateless seed (seed + e, b): no
            # generator state, so a resumed run draws exactly what an uninterrupted one would.
            batches = batches.enumerate().map(lambda b, batch: mix_pairs(*batch, mixup, tf.stack([seed + epoch, b])))
        return batches

    # Each epoch is built with its seed as a Python int. A seed that is a tensor (the epoch of a
    # Dataset.range(...).flat_map) crashes tf.random_seed.get_seed with OperatorNotAllowedInGraphError
    # whenever the global seed is 0 (`seed: 0` in params.yaml), as it compares the pair with (0, 0).
    batches = concatenated([one_epoch(epoch) for epoch in range(first_epoch, epochs)])
    return batches.prefetch(tf.data.AUTOTUNE), math.ceil(n / batch_size)


def concatenated(datasets: list[tf.data.Dataset]) -> tf.data.Dataset:
    """The datasets one after the other, joined as a balanced tree (depth log2 n, not n)."""
    while len(datasets) > 1:
        pairs = [datasets[i].concatenate(datasets[i + 1]) for i in range(0, len(datasets) - 1, 2)]
        datasets = pairs + datasets[len(datasets) - len(datasets) % 2 :]
    return datasets[0]


def mix_pairs(images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp (Zhang et al., 2018): example i blended with example n-1-i of the batch, pixels and labels alike.

    The batch is already in random order, so pairing it with its own reverse (as
    timm does) is a random pairing. Each example draws its weight w from
    Beta(alpha, alpha), as X / (X + Y) with X, Y ~ Gamma(alpha). keras.layers.MixUp
    does the same, but draws from a generator whose state a resumed run would not
    have, and mixes only [n, classes] labels, not the one column of two classes.
    """
    gammas = tf.random.stateless_gamma(tf.stack([2, tf.shape(images)[0]]), seed=seed, alpha=alpha)
    weights = tf.math.divide_no_nan(gammas[0], gammas[0] + gammas[1])  # both 0 only for a tiny alpha
    return blend(tf.cast(images, tf.float32), weights), blend(tf.cast(labels, tf.float32), weights)


def blend(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    weights = tf.reshape(weights, [-1] + [1] * (len(values.shape) - 1))
    return weights * values + (1.0 - weights) * tf.reverse(values, axis=[0])


def one_hot(batches: tf.data.Dataset, classes: int) -> tf.data.Dataset:
    """(images, labels) batches with the labels one-hot encoded into `classes`; 0 = as they are."""
    if not classes:
        return batches
    return batches.map(lambda images, labels: (images, tf.one_hot(labels, classes)))


def ordered_batches(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    cache: bool = False,
    classes: int = 0,
) -> tf.data.Dataset:
    """Batches in file order: validation (cache=True, read every epoch) and prediction (one pass).

    `classes` > 0 one-hot encodes the labels, as training_batches does.
    """
    ds = stream(images, labels)
    if cache:
        ds = ds.cache()
    ds = ds.batch(batch_size)
    if labels is not None:
        ds = one_hot(ds, classes)
    return ds.prefetch(tf.data.AUTOTUNE)


def mirrored(batches: tf.data.Dataset) -> tf.data.Dataset:
    """Batches of images [n, height, width, channels] flipped left to right (test-time augmentation)."""
    return batches.map(lambda images: tf.reverse(images, axis=[2]))
