"""The training ingredients of a from-scratch record (issue 13): what each one changes, and that off is off.

Augmentation layers (translation, contrast), AdamW with weight decay, warm-up,
label smoothing, MixUp, a moving average of the weights (EMA) and test-time
augmentation, on tiny synthetic photos. Resuming with them: test_train_resume.py.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from convnets.datasets import ordered_batches, training_batches
from convnets.models import build_model, loss_for, one_hot_classes
from convnets.params import ModelParams, Params, TrainParams
from convnets.train import learning_rate_schedule, make_optimizer, plan_phases, train
from test_train_pipeline import make_prepared

SMALL = {"conv_filters": [8, 16], "pooled_blocks": 2}


def layer_kinds(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


# --- augmentation layers ---------------------------------------------------------------


def test_translation_and_contrast_layers_when_on_and_only_then():
    model = build_model(
        ModelParams.model_validate({**SMALL, "augmentation": {"translation": 0.1, "contrast": 0.2}}), (32, 32, 3), 2
    )
    kinds = layer_kinds(model)
    assert kinds[1:4] == ["RandomTranslation", "RandomContrast", "Rescaling"]
    translation, contrast = model.layers[1], model.layers[2]
    assert (translation.height_factor, translation.width_factor) == (0.1, 0.1)
    # Factors drawn from [1 - 0.2, 1 + 0.2], on pixels that still span 0-255 (before Rescaling).
    assert contrast.factor == (0.2, 0.2) and tuple(contrast.value_range) == (0, 255)
    photos = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.predict(photos, verbose=0), model.predict(photos, verbose=0))
    assert not np.allclose(model(photos, training=True), model(photos, training=True))

    default = layer_kinds(build_model(ModelParams(), (28, 28, 1), 10))
    assert default == ["InputLayer", "Rescaling", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D"] + [
        "Conv2D",
        "Flatten",
        "Dense",
    ]


# --- targets: one-hot, smoothing, MixUp ----------------------------------------------------


@pytest.fixture
def coded():
    """48 one-pixel 'photos' whose pixel is 200 x their 0/1 label: a blend shows in both alike."""
    labels = np.arange(48, dtype=np.int64) % 2
    return (200 * labels).astype(np.uint8).reshape(48, 1, 1, 1), labels


def test_without_mixup_the_labels_stay_integers(coded):
    images, labels = coded
    batches, _ = training_batches(images, labels, batch_size=16, seed=3, first_epoch=0, epochs=2)
    for pixels, batch in batches:
        assert batch.dtype == "int64" and pixels.dtype == "uint8"
        np.testing.assert_array_equal(pixels.numpy()[:, 0, 0, 0], 200 * batch.numpy())


def test_mixup_blends_photos_and_labels_alike(coded):
    images, labels = coded
    batches, _ = training_batches(images, labels, batch_size=16, seed=3, first_epoch=0, epochs=2, mixup=0.4)
    mixed = [(pixels.numpy()[:, 0, 0, 0], batch.numpy()) for pixels, batch in batches]
    soft = np.concatenate([batch for _, batch in mixed])
    assert soft.dtype == np.float32 and soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0.01) & (soft < 0.99)).mean() > 0.3  # soft labels, not 0/1
    for pixels, batch in mixed:
        # The same weight and the same partner for the pixels and the label.
        np.testing.assert_allclose(pixels / 200, batch, atol=1e-5)


def test_mixup_draws_the_same_blends_in_a_resumed_run(coded):
    images, labels = coded
    full, steps = training_batches(images, labels, 16, seed=3, first_epoch=0, epochs=3, mixup=0.4)
    resumed, _ = training_batches(images, labels, 16, seed=3, first_epoch=2, epochs=3, mixup=0.4)
    full_labels = np.concatenate([batch.numpy() for _, batch in full])
    resumed_labels = np.concatenate([batch.numpy() for _, batch in resumed])
    np.testing.assert_array_equal(full_labels[2 * 48 :], resumed_labels)
    assert not np.allclose(full_labels[:48], full_labels[48:96])  # every epoch its own blends


def test_more_than_two_classes_go_one_hot_and_mix_per_class():
    images = np.zeros((30, 2, 2, 1), np.uint8)
    labels = np.arange(30, dtype=np.int64) % 3
    plain, _ = training_batches(images, labels, 10, seed=0, first_epoch=0, epochs=1, classes=3)
    for _, batch in plain:
        assert batch.shape == (10, 3) and set(np.unique(batch.numpy())) == {0.0, 1.0}
    mixed, _ = training_batches(images, labels, 10, seed=0, first_epoch=0, epochs=1, classes=3, mixup=0.4)
    for _, batch in mixed:
        np.testing.assert_allclose(batch.numpy().sum(axis=1), 1.0, atol=1e-6)
        assert ((batch.numpy() > 0.01) & (batch.numpy() < 0.99)).any()
    # Validation: one-hot as well, never mixed, in file order.
    val = np.concatenate([batch.numpy() for _, batch in ordered_batches(images, labels, 8, classes=3)])
    np.testing.assert_array_equal(val, np.eye(3)[labels])


def test_soft_targets_need_one_hot_labels_only_beyond_two_classes():
    assert one_hot_classes(10, 0.0, 0.0) == 0  # the default: sparse integer labels, as before
    assert one_hot_classes(10, 0.1, 0.0) == 10 and one_hot_classes(10, 0.0, 0.2) == 10
    assert one_hot_classes(2, 0.1, 0.2) == 0  # one sigmoid output: the label is already a probability
    assert loss_for(2) == "binary_crossentropy" and loss_for(10) == "sparse_categorical_crossentropy"
    with pytest.raises(ValueError, match="one-hot"):
        loss_for(10, 0.1)


def test_label_smoothing_moves_the_targets_off_0_and_1():
    s = 0.2
    p = np.array([[0.9], [0.2], [0.6]], np.float32)
    y = np.array([1.0, 0.0, 1.0], np.float32)
    smoothed = y * (1 - s) + s / 2
    expected = -np.mean(smoothed * np.log(p[:, 0]) + (1 - smoothed) * np.log(1 - p[:, 0]))
    assert float(loss_for(2, s)(y[:, None], p)) == pytest.approx(expected, rel=1e-5)
    assert float(keras.losses.BinaryCrossentropy()(y[:, None], p)) != pytest.approx(expected, rel=1e-3)

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    onehot = np.eye(3, dtype=np.float32)[[0, 2]]
    targets = onehot * (1 - s) + s / 3
    expected = -np.mean((targets * np.log(probs)).sum(axis=1))
    assert float(loss_for(3, s, one_hot=True)(onehot, probs)) == pytest.approx(expected, rel=1e-5)


def three_classes(root, sizes=(60, 30, 30), size=16):
    """Like make_prepared, three classes: 0 dark, 1 a bright left half, 2 a bright right half."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for subset, count in zip(("train", "val", "test"), sizes):
        labels = np.arange(count) % 3
        images = rng.integers(0, 80, (count, size, size, 3), dtype=np.uint8)
        images[labels == 1, :, : size // 2] += 150
        images[labels == 2, :, size // 2 :] += 150
        np.save(root / f"{subset}_images.npy", images)
        np.save(root / f"{subset}_labels.npy", labels.astype(np.int64))
    (root / "classes.json").write_text(json.dumps(["dark", "left", "right"]) + "\n")
    return root


def test_smoothing_and_mixup_of_three_classes_keep_the_accuracy_right(tmp_path):
    """One-hot labels: Keras's 'accuracy' becomes the one-hot accuracy, and still counts correct photos."""
    prepared = three_classes(tmp_path / "prepared")
    params = Params.model_validate(
        {"model": SMALL, "train": {"epochs": 2, "batch_size": 15, "label_smoothing": 0.1, "mixup": 0.2}}
    )
    best = train(params, prepared, tmp_path / "model", tmp_path / "train")
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    val_labels = np.load(prepared / "val_labels.npy")
    predicted = model.predict(np.load(prepared / "val_images.npy"), verbose=0).argmax(axis=1)
    assert best["val_accuracy"] == pytest.approx((predicted == val_labels).mean())


# --- optimizer, warm-up, EMA --------------------------------------------------------------------


def rates(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_adamw_takes_the_weight_decay_and_ema_the_momentum():
    adamw = make_optimizer("adamw", 0.01, weight_decay=0.05, ema=0.999)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.05
    assert adamw.use_ema and adamw.ema_momentum == 0.999
    plain = make_optimizer("rmsprop", 0.001)  # the default: a fixed rate, no average
    assert isinstance(plain, keras.optimizers.RMSprop) and not plain.use_ema
    assert float(plain.learning_rate) == pytest.approx(0.001)


def test_warm_up_rises_linearly_then_holds_or_decays():
    constant = learning_rate_schedule(0.01, "constant", steps=100, warmup_steps=10)
    assert rates(constant, [0, 5, 10, 50, 99]) == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01])
    cosine = learning_rate_schedule(0.01, "cosine", steps=100, warmup_steps=10)
    assert rates(cosine, [0, 5, 10, 55, 100]) == pytest.approx([0.0, 0.005, 0.01, 0.005, 0.0], abs=1e-7)
    without = learning_rate_schedule(0.01, "cosine", steps=100)  # as before: no warm-up
    assert rates(without, [0, 50, 100]) == pytest.approx([0.01, 0.005, 0.0], abs=1e-7)
    assert learning_rate_schedule(0.01, "constant", steps=100) == 0.01
    # A first phase shorter than the warm-up warms up throughout (a quick -S train.epochs=3).
    (first,) = plan_phases(ModelParams(), TrainParams(epochs=3, warmup_epochs=5))
    assert first.warmup_epochs == 3
    # The optimizer reads the schedule at its own step counter, which resume restores.
    optimizer = make_optimizer("adam", 0.01, "constant", steps=100, warmup_steps=10)
    optimizer.iterations.assign(5)
    assert float(optimizer.learning_rate) == pytest.approx(0.005)


def val_loss_of(model_file, prepared) -> float:
    model = keras.models.load_model(model_file)
    model.compile(loss="binary_crossentropy")
    return model.evaluate(np.load(prepared / "val_images.npy"), np.load(prepared / "val_labels.npy"), verbose=0)


def test_ema_weights_are_validated_kept_and_saved(tmp_path):
    """Validation scores the averaged weights, and the saved model is those weights, not the trained ones."""
    prepared = make_prepared(tmp_path / "prepared")
    base = {"model": SMALL, "train": {"epochs": 3, "batch_size": 16, "optimizer": "adam"}}
    weights = {}
    for name, ema in (("raw", 0.0), ("ema", 0.8)):
        params = Params.model_validate({**base, "train": {**base["train"], "ema": ema}})
        best = train(params, prepared, tmp_path / name / "model", tmp_path / name / "train")
        weights[name] = keras.models.load_model(tmp_path / name / "model" / "model.keras").get_weights()
    # The saved model reproduces the best epoch's logged val_loss: validation saw these very weights.
    assert val_loss_of(tmp_path / "ema" / "model" / "model.keras", prepared) == pytest.approx(
        best["val_loss"], rel=1e-5
    )
    # Averaging leaves training alone (same seed, same first epoch) but saves other weights.
    first_loss = [
        pd.read_csv(tmp_path / name / "train/plots/metrics/train/loss.tsv", sep="\t")["loss"][0] for name in weights
    ]
    assert first_loss[0] == first_loss[1]
    assert not all(np.array_equal(a, b) for a, b in zip(weights["ema"], weights["raw"]))


# --- test-time augmentation ------------------------------------------------------------------


@pytest.fixture
def untrained_model(tmp_path):
    """A saved model with random weights (its outputs differ under a flip) and prepared test photos."""
    from convnets.trained import save_model

    prepared = make_prepared(tmp_path / "prepared", sizes=(16, 16, 40))
    keras.utils.set_random_seed(1)
    model = build_model(ModelParams.model_validate(SMALL), (32, 32, 3), 2)
    (tmp_path / "model").mkdir()
    save_model(model, tmp_path / "model" / "model.keras")
    (tmp_path / "model" / "classes.json").write_text(json.dumps(["cat", "dog"]) + "\n")
    return tmp_path, prepared, model


def test_tta_averages_each_photo_with_its_mirror(untrained_model):
    from convnets.evaluate import class_probabilities

    _, prepared, model = untrained_model
    images = np.load(prepared / "test_images.npy")
    p_dog = model.predict(images, verbose=0)[:, 0]
    p_mirror = model.predict(images[:, :, ::-1], verbose=0)[:, 0]
    assert not np.allclose(p_dog, p_mirror)  # else the test could not tell
    with_tta = class_probabilities(model, images, batch_size=16, tta=True)
    np.testing.assert_allclose(with_tta[:, 1], (p_dog + p_mirror) / 2, rtol=1e-5)
    np.testing.assert_allclose(class_probabilities(model, images, batch_size=16)[:, 1], p_dog, rtol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_records_whether_tta_ran(untrained_model, tta):
    from convnets.evaluate import evaluate

    root, prepared, model = untrained_model
    params = Params.model_validate({"evaluate": {"tta": tta, "heatmaps": 0}})
    metrics = evaluate(params, prepared, root / "model", root / f"eval-{tta}")
    images, labels = np.load(prepared / "test_images.npy"), np.load(prepared / "test_labels.npy")
    p_dog = model.predict(images, verbose=0)[:, 0].astype(np.float64)
    if tta:
        p_dog = (p_dog + model.predict(images[:, :, ::-1], verbose=0)[:, 0]) / 2
    assert metrics["loss"] == pytest.approx(log_loss(labels, p_dog, labels=[0, 1]), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(((p_dog > 0.5) == labels).mean())
    logged = json.loads((root / f"eval-{tta}" / "metrics.json").read_text())["test"]
    assert logged["tta"] == int(tta) and isinstance(logged["tta"], int)
    predictions = pd.read_csv(root / f"eval-{tta}" / "predictions.csv")
    np.testing.assert_allclose(predictions["confidence"], np.maximum(p_dog, 1 - p_dog), atol=2e-6)
