"""train.ema: a moving average of the weights that is worth validating from the first epochs.

Keras's optimizers keep the average themselves (`use_ema=True`, one slot per
trainable variable, saved with the optimizer's state, so a resumed run goes on
with it). As Keras does it, two things make the average a poor model to validate:

- Its momentum is fixed from the second step on. At 0.999 the average keeps 73%
  of the first step's weights (nearly the random initial ones) after 315 steps,
  five epochs of the book's 2,000 photos at batch 32: validation, the best-epoch
  choice and the saved model then see mostly an untrained network. Here the
  momentum warms up as tf.train.ExponentialMovingAverage's `num_updates` makes it:
  min(ema, (1 + t) / (10 + t)) at step t, so the average spans roughly the last
  tenth of the steps so far until it reaches the momentum asked for.
- Only trainable variables are averaged. BatchNormalization's moving mean and
  variance keep following the raw weights, so a model with the averaged weights
  would normalise with statistics of other weights. Before each validation,
  AveragedWeights recomputes them for the averaged weights, in training mode on a
  fixed sample of training photos (as torch.optim.swa_utils.update_bn does), as the
  mean of each batch's statistics (BatchStatistics).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from convnets.datasets import stream

# Photos of the training split (a fixed, seeded sample) whose batches recompute
# BatchNormalization's statistics for the averaged weights before each validation.
# Each batch's per-channel mean already runs over batch x height x width values,
# so 512 photos pin the statistics down at a small cost: about a quarter of a
# training epoch's photos at 2,000, seen forward only.
STATISTICS_PHOTOS = 512


def averaging_momentum(step, ema: float):
    """The average's momentum at optimizer step `step` (0-based): 0 first, then warming up to `ema`."""
    step = ops.cast(step, "float32")
    warming = ops.minimum(ema, (1.0 + step) / (10.0 + step))
    return ops.where(ops.equal(step, 0.0), 0.0, warming)  # the first step copies the weights, as Keras does


class WarmedUpAverage:
    """Mixed into a Keras optimizer class: its use_ema average follows averaging_momentum."""

    def _update_model_variables_moving_average(self, trainable_variables):
        # Replaces Keras's fixed-momentum update (BaseOptimizer, same name), which apply() calls
        # after each step, before the step counter moves on.
        momentum = averaging_momentum(self.iterations, self.ema_momentum)
        for var, average in zip(trainable_variables, self._model_variables_moving_average, strict=True):
            if average is not None:
                kept = ops.cast(momentum, var.dtype)
                average.assign(kept * average + (1.0 - kept) * var)


def with_warmed_up_average(optimizer_class: type[keras.optimizers.Optimizer]) -> type[keras.optimizers.Optimizer]:
    """The optimizer class with WarmedUpAverage's averaging (use it with use_ema=True)."""
    return type(optimizer_class.__name__, (WarmedUpAverage, optimizer_class), {})


def batch_normalizations(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers that training mode updates, nested models included."""
    found = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable:  # a frozen one normalises with its stored statistics even in training mode
                found.append(layer)
        else:
            found.extend(batch_normalizations(layer))
    return found


def statistics_batches(images: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """A fixed sample of STATISTICS_PHOTOS training photos, in batches, the same every epoch."""
    count = min(STATISTICS_PHOTOS, len(images))
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=count, replace=False))
    return stream(np.ascontiguousarray(images[chosen])).cache().batch(batch_size)


class BatchStatistics:
    """Sets each BatchNormalization's moving mean and variance to their averages over `batches`.

    Runs the model forward in training mode (augmentation and dropout included, as training
    sees the photos) with every layer's momentum at 0, so that each pass leaves its batch's
    statistics, and averages those in float64. The whole pass, the loop over the batches
    included, is one tf.function, traced once and kept: nothing returns to Python between
    batches (eager calls cost about twice as much on mini_xception, and a read-back of every
    layer's statistics per batch stalls the pass on a loaded machine). The momentum of 0 is
    read when it is traced, and set again before every recompute in case it retraces.
    """

    def __init__(self, model: keras.Model, batches: tf.data.Dataset):
        self.model, self.batches = model, batches
        self.layers = batch_normalizations(model)
        self._pass = None

    def recompute(self) -> int:
        """Recompute the statistics for the model's current weights; returns the number of layers."""
        if not self.layers:
            return 0
        momenta = [layer.momentum for layer in self.layers]
        try:
            for layer in self.layers:
                layer.momentum = 0.0
            if self._pass is None:
                self._pass = tf.function(self._averaged_statistics)
            self._pass(self.batches)
        finally:
            for layer, momentum in zip(self.layers, momenta, strict=True):
                layer.momentum = momentum
        return len(self.layers)

    def _averaged_statistics(self, batches: tf.data.Dataset) -> None:
        statistics = self._statistics()
        sums = tuple(tf.zeros(variable.shape, "float64") for variable in statistics)
        count = tf.constant(0.0, "float64")
        for images in batches:  # AutoGraph: a loop in the graph
            sums = self._add_batch(images, sums)
            count += 1.0
        self._assign_means(sums, count)

    def _statistics(self) -> list:
        """Each layer's moving mean and variance, in that order."""
        return [variable for layer in self.layers for variable in (layer.moving_mean, layer.moving_variance)]

    @tf.autograph.experimental.do_not_convert
    def _add_batch(self, images, sums: tuple) -> tuple:
        self.model(images, training=True)  # momentum 0: each layer now holds this batch's statistics
        # float64 sums in batch order: the bits NumPy's accumulation gave.
        return tuple(total + tf.cast(v, "float64") for total, v in zip(sums, self._statistics(), strict=True))

    @tf.autograph.experimental.do_not_convert
    def _assign_means(self, sums: tuple, count) -> None:
        for variable, total in zip(self._statistics(), sums, strict=True):
            variable.assign(tf.cast(total / count, variable.dtype))


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """The averaged weights, with their own BatchNorm statistics, are what validation and the backup see.

    Listed before EpochBackup, it swaps the averaged weights into the model for
    each validation (recomputing the BatchNorm statistics for them first, when
    `statistics` batches are given) and at the end of every epoch, as Keras
    advises for a checkpoint of them: the best weights EpochBackup keeps, and so
    the saved model, are the averaged ones, and the state file holds the averaged
    weights in the model's place and the trained ones in the optimizer's. A
    resumed run loads that file as it is; `in_model` tells the callback where the
    averages are, so that its first epoch swaps them out, as the uninterrupted run did.

    The raw weights are trained with the recomputed statistics left in place:
    training mode normalises each batch with its own statistics, so nothing the
    raw weights compute reads them.
    """

    def __init__(self, statistics: tf.data.Dataset | None = None, in_model: bool = False, stops_early: bool = False):
        super().__init__(swap_on_epoch=True)
        self.statistics = statistics
        self._batch_statistics = None  # BatchStatistics of the model, made at the first validation
        self._graphs = {}  # (optimizer, swap or finalize): its tf.function
        self._ema_weights_in_model = in_model  # SwapEMAWeights's own record of where the averages are
        self.stops_early = stops_early  # this fit ends before its phase does (train.stop_at_epoch)

    def _tf_swap_variables(self, optimizer):
        self._traced(optimizer, "swap", super()._tf_swap_variables)()

    def _tf_finalize_ema_values(self, optimizer):
        self._traced(optimizer, "finalize", super()._tf_finalize_ema_values)()

    def _traced(self, optimizer, name: str, method):
        """Keras's swap (or finalize) of `optimizer`'s variables as one tf.function, traced once.

        The same adds and subtractions (the swap is arithmetic, a + b - b, so the bits stay
        Keras's), but one graph call instead of three eager strategy updates per variable.
        """
        key = (id(optimizer), name)
        if key not in self._graphs:
            self._graphs[key] = tf.function(lambda: method(optimizer))
        return self._graphs[key]

    def on_epoch_end(self, epoch, logs=None):
        """As SwapEMAWeights, except after the last epoch of a fit that stops before its phase ends.

        There SwapEMAWeights copies the averages over the trained weights that the optimizer
        holds (for Keras's finalize_variable_values), and the backup would keep no trained
        weights: the run that goes on would train on from the averages. So the swap alone.
        """
        if self.stops_early and epoch == self.params["epochs"] - 1:
            if not self._ema_weights_in_model:
                self._swap_variables()
                self._ema_weights_in_model = True
            return
        super().on_epoch_end(epoch, logs)

    def on_test_begin(self, logs=None):
        super().on_test_begin(logs)  # the averaged weights are in the model now
        if self.statistics is not None:
            if self._batch_statistics is None:
                self._batch_statistics = BatchStatistics(self.model, self.statistics)
            self._batch_statistics.recompute()
