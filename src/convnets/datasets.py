"""Feed the arrays that `preprocess` wrote to Keras through tf.data.

The prepared images are memory-mapped uint8 .npy files. The input pipeline
streams them in chunks into a tf.data cache (RAM) on the first pass, so later
epochs never touch Python or the disk: the model, not the input, is the
bottleneck. Shuffling is keyed by the epoch number (seed, epoch), so the
batches of epoch 7 are the same whether a run went straight through or was
killed after epoch 6 and resumed.
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
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int
) -> tuple[tf.data.Dataset, int]:
    """Shuffled batches for epochs [first_epoch, epochs), one after the other; and steps per epoch.

    Give Keras the steps per epoch: it then keeps one iterator over the whole
    stream, which is what lets the shuffle order depend on the epoch number.
    """
    cached = stream(images, labels).cache()
    n = len(labels)

    def one_epoch(epoch):
        # Epoch e is shuffled with seed + e (as PyTorch's DistributedSampler.set_epoch
        # does): a fresh order every epoch, the same order for epoch e in a resumed run.
        return cached.shuffle(n, seed=seed + epoch, reshuffle_each_iteration=False).batch(batch_size)

    batches = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return batches.prefetch(tf.data.AUTOTUNE), math.ceil(n / batch_size)


def ordered_batches(
    images: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 256, cache: bool = False
) -> tf.data.Dataset:
    """Batches in file order: validation (cache=True, read every epoch) and prediction (one pass)."""
    ds = stream(images, labels)
    if cache:
        ds = ds.cache()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
