"""train.ema: the average's warm-up and the BatchNorm statistics of the averaged weights, in exact numbers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from convnets.averaging import (
    STATISTICS_PHOTOS,
    AveragedWeights,
    BatchStatistics,
    averaging_momentum,
    batch_normalizations,
    statistics_batches,
    with_warmed_up_average,
)
from convnets.train import make_optimizer, seed_everything


def momentum_at(step: int, ema: float) -> float:
    return float(averaging_momentum(step, ema))


def test_the_momentum_starts_at_zero_and_warms_up_to_the_one_asked_for():
    assert momentum_at(0, 0.999) == 0.0  # the first step copies the weights
    assert momentum_at(1, 0.999) == pytest.approx(2 / 11)
    assert momentum_at(90, 0.999) == pytest.approx(91 / 100)
    assert momentum_at(8991, 0.999) == pytest.approx(0.999)  # (1 + t) / (10 + t) reaches 0.999 there
    assert momentum_at(100_000, 0.999) == pytest.approx(0.999)
    assert momentum_at(50, 0.5) == 0.5


def test_after_n_steps_the_average_is_what_the_schedule_says():
    """SGD on one variable with fixed gradients; the average computed by hand in float64."""
    ema, steps = 0.9, 12  # within the warm-up: (1 + t) / (10 + t) reaches 0.9 at t = 80 (the cap: above)
    variable = keras.Variable(np.array([1.0, -2.0, 0.5], dtype="float32"))
    optimizer = with_warmed_up_average(keras.optimizers.SGD)(learning_rate=0.1, use_ema=True, ema_momentum=ema)
    optimizer.build([variable])
    gradients = np.random.default_rng(0).normal(1.0, 1.0, size=(steps, 3)).astype("float32")  # a drift
    expected, raw = None, []
    for step, gradient in enumerate(gradients):
        optimizer.apply([gradient], [variable])
        weights = np.asarray(variable.numpy(), dtype="float64")
        raw.append(weights)
        kept = 0.0 if step == 0 else min(ema, (1 + step) / (10 + step))
        expected = weights if expected is None else kept * expected + (1 - kept) * weights
    (average,) = optimizer._model_variables_moving_average
    np.testing.assert_allclose(average.numpy(), expected, rtol=1e-6)
    # Keras's own average (fixed momentum from step 1) would be elsewhere: the test can tell them apart.
    keras_average = raw[0]
    for weights in raw[1:]:
        keras_average = ema * keras_average + (1 - ema) * weights
    assert np.abs(average.numpy() - keras_average).max() > 0.01


def test_make_optimizer_warms_the_average_up_only_when_asked():
    averaged = make_optimizer("adamw", 0.01, weight_decay=0.05, ema=0.999)
    assert isinstance(averaged, keras.optimizers.AdamW) and averaged.use_ema and averaged.ema_momentum == 0.999
    assert type(averaged).__name__ == "AdamW"  # Keras's messages and config name it as before
    assert type(averaged)._update_model_variables_moving_average is not (
        keras.optimizers.AdamW._update_model_variables_moving_average
    )
    assert type(make_optimizer("adamw", 0.01)) is keras.optimizers.AdamW


def normalised_model(seed: int = 0) -> keras.Model:
    """Dense -> BatchNorm -> Dense: the BatchNorm's input depends on the Dense weights only."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    normalised = keras.layers.BatchNormalization(name="bn")(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(normalised))


def toy_data(count: int = 96, seed: int = 1):
    rng = np.random.default_rng(seed)
    features = rng.normal(2.0, 3.0, size=(count, 4)).astype("float32")
    return features, (features.sum(axis=1) > 8).astype("float32")


class SeenAtValidation(keras.callbacks.Callback):
    """What the model holds while validation runs (its Dense weights and BatchNorm statistics), and
    the Dense weights it trained up to then."""

    def __init__(self):
        super().__init__()
        self.seen, self.trained = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.last_trained = np.array(self.model.get_layer("hidden").get_weights()[0])

    def on_test_begin(self, logs=None):
        self.trained.append(self.last_trained)

        hidden, bn = self.model.get_layer("hidden"), self.model.get_layer("bn")
        kernel, bias = (np.array(v) for v in hidden.get_weights())
        self.seen.append((kernel, bias, np.array(bn.moving_mean), np.array(bn.moving_variance)))


def test_validation_normalises_the_averaged_weights_with_their_own_statistics():
    features, labels = toy_data()
    model = normalised_model()
    model.compile(
        optimizer=with_warmed_up_average(keras.optimizers.SGD)(learning_rate=0.05, use_ema=True, ema_momentum=0.9),
        loss="binary_crossentropy",
    )
    sample = statistics_batches(features, batch_size=len(features), seed=3)  # one batch: all 96 rows
    seen = SeenAtValidation()
    model.fit(
        features,
        labels,
        batch_size=16,
        epochs=3,
        validation_data=(features[:32], labels[:32]),
        callbacks=[AveragedWeights(sample), seen],
        verbose=0,
    )
    assert len(seen.seen) == 3
    for (kernel, bias, mean, variance), trained in zip(seen.seen, seen.trained, strict=True):
        hidden = features.astype("float64") @ kernel + bias  # the BatchNorm's input, computed from scratch
        np.testing.assert_allclose(mean, hidden.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(variance, hidden.var(axis=0), rtol=1e-4, atol=1e-5)
        # What validation ran was the average, not the weights trained so far: the test can tell.
        assert not np.allclose(kernel, trained, rtol=1e-3)
        trained_stats = (features @ trained).mean(axis=0)
        assert not np.allclose(mean, trained_stats + bias, rtol=1e-3)
    assert model.get_layer("bn").momentum == 0.99  # the layer's own momentum is back


def test_statistics_are_the_running_mean_over_batches():
    """Several batches: the moving statistics are the mean of the batches' statistics, not an EMA of them."""
    features, _ = toy_data(count=60)
    model = normalised_model()
    kernel, bias = model.get_layer("hidden").get_weights()
    batches = statistics_batches(features, batch_size=20, seed=5)  # all 60 rows, in 3 batches of 20
    assert BatchStatistics(model, batches).recompute() == 1
    hidden = [np.asarray(batch, dtype="float64") @ kernel + bias for batch in batches]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean, np.mean([h.mean(axis=0) for h in hidden], axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, np.mean([h.var(axis=0) for h in hidden], axis=0), rtol=1e-5)


def test_the_statistics_sample_is_fixed_and_bounded():
    images = np.arange(2000, dtype=np.uint8).reshape(2000, 1) % 251
    first = np.concatenate([np.asarray(b) for b in statistics_batches(images, 32, seed=7)])
    again = np.concatenate([np.asarray(b) for b in statistics_batches(images, 32, seed=7)])
    assert len(first) == STATISTICS_PHOTOS and np.array_equal(first, again)
    assert len(np.concatenate([np.asarray(b) for b in statistics_batches(images[:100], 32, seed=7)])) == 100


def test_frozen_and_nested_batch_normalizations():
    inner_inputs = keras.Input((4,))
    inner = keras.Model(inner_inputs, keras.layers.BatchNormalization(name="inner_bn")(inner_inputs))
    inputs = keras.Input((4,))
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    frozen.trainable = False
    model = keras.Model(inputs, frozen(inner(inputs)))
    assert [layer.name for layer in batch_normalizations(model)] == ["inner_bn"]


# --- today's numbers, kept: the averaging as first written, step by step in eager Python -----------


class ReferenceWarmedUpAverage:
    """The warmed-up average as first written: momentum 0 at step 0, then min(ema, (1 + t) / (10 + t))."""

    def _update_model_variables_moving_average(self, trainable_variables):
        step = keras.ops.cast(self.iterations, "float32")
        warming = keras.ops.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step))
        momentum = keras.ops.where(keras.ops.equal(step, 0.0), 0.0, warming)
        for var, average in zip(trainable_variables, self._model_variables_moving_average, strict=True):
            kept = keras.ops.cast(momentum, var.dtype)
            average.assign(kept * average + (1.0 - kept) * var)


class ReferenceAveragedWeights(keras.callbacks.SwapEMAWeights):
    """Keras's swaps, and before each validation the BatchNorm statistics recomputed batch by batch:
    a traced forward pass in training mode with momentum 0, each batch's statistics read back and
    averaged in float64."""

    def __init__(self, batches):
        super().__init__(swap_on_epoch=True)
        self.batches, self.forward = batches, None

    def on_test_begin(self, logs=None):
        super().on_test_begin(logs)
        layers = batch_normalizations(self.model)
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.momentum = 0.0
        self.forward = self.forward or tf.function(lambda images: self.model(images, training=True))
        means = [np.zeros(layer.moving_mean.shape, "float64") for layer in layers]
        variances = [np.zeros(layer.moving_variance.shape, "float64") for layer in layers]
        for count, images in enumerate(self.batches, start=1):
            self.forward(images)
            for index, layer in enumerate(layers):
                means[index] += np.asarray(layer.moving_mean)
                variances[index] += np.asarray(layer.moving_variance)
        for layer, mean, variance, momentum in zip(layers, means, variances, momenta, strict=True):
            layer.moving_mean.assign(mean / count)
            layer.moving_variance.assign(variance / count)
            layer.momentum = momentum


def augmented_normalised_model() -> keras.Model:
    """A tiny convnet with what the record model has around its BatchNorms: augmentation and Dropout,
    whose random states the statistics pass moves on."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.RandomFlip("horizontal")(inputs)
    x = keras.layers.RandomContrast(0.2)(x)
    for filters in (4, 6):
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def state_after_two_epochs(optimizer_class, callback_for) -> list[np.ndarray]:
    """Every variable of the model and the optimizer after 2 epochs of train.ema (averages, BatchNorm
    statistics and random states included), trained as train.py trains it."""
    seed_everything(4, deterministic=True)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(80, 8, 8, 3)).astype("uint8")
    labels = (images[..., 0].mean(axis=(1, 2)) > 127).astype("float32")
    model = augmented_normalised_model()
    optimizer = optimizer_class(learning_rate=0.01, weight_decay=0.05, use_ema=True, ema_momentum=0.999)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    callback = callback_for(statistics_batches(images, batch_size=16, seed=4))
    model.fit(
        images,
        labels,
        batch_size=16,
        epochs=2,
        validation_data=(images[:32], labels[:32]),
        callbacks=[callback],
        verbose=0,
    )
    return [np.array(v) for v in model.variables + optimizer.variables]


def test_two_epochs_end_with_the_numbers_the_first_averaging_gave():
    """Identical bits, not close ones: a faster averaging pass must not change a run's numbers."""
    reference_optimizer = type("AdamW", (ReferenceWarmedUpAverage, keras.optimizers.AdamW), {})
    expected = state_after_two_epochs(reference_optimizer, ReferenceAveragedWeights)
    got = state_after_two_epochs(with_warmed_up_average(keras.optimizers.AdamW), AveragedWeights)
    assert len(got) == len(expected)
    for index, (value, reference) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(value, reference), f"variable {index} differs from today's numbers"
