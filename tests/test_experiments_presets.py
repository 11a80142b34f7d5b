"""The book's dogs-vs-cats experiments as presets: composition, architectures, pretrained weights."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT
from convnets.errors import DataError, ParamsError
from convnets.models import build_convnet, build_model
from convnets.params import AugmentationParams, ModelParams, Params, TrainParams, load_params

EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))
MODEL_DIR = REPO_ROOT / "conf" / "model"
MODEL_PRESETS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if p.stem != "base")
BOOK_180 = (180, 180, 3)


def compose(tmp_path, *overrides) -> Path:
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, os.fspath(REPO_ROOT / "conf"), None, "config", "", list(overrides))
    return out


@functools.cache
def preset(name: str) -> dict:
    """The params a model preset composes to (over conf/model/base.yaml, as dvc exp run composes them)."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "params.yaml"
        compose_and_dump(out, os.fspath(REPO_ROOT / "conf"), None, "config", "", [f"model={name}"])
        return yaml.safe_load(out.read_text())


def model_params(name: str, **changes) -> ModelParams:
    return ModelParams.model_validate({**preset(name)["model"], **changes})


def test_the_book_experiments_are_all_there():
    assert {"scratch", "augmented", "feature_extraction", "feature_extraction_augmented", "fine_tuning"} <= set(
        EXPERIMENTS
    )
    assert set(EXPERIMENTS) <= set(MODEL_PRESETS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_override_selects_the_data_and_the_model(tmp_path, name):
    """`dvc exp run -S +experiment=NAME` composes exactly this (DVC calls the same function)."""
    params = load_params(compose(tmp_path, f"+experiment={name}"))
    assert params.fetch.source == "archive" and params.fetch.classes == ["cat", "dog"]
    assert params.split.method == "index_ranges" and params.preprocess.channels == 3
    assert params.model.model_dump() == ModelParams.model_validate(preset(name)["model"]).model_dump()
    assert params.train.model_dump() == TrainParams.model_validate(preset(name)["train"]).model_dump()
    # Further -S overrides apply on top, e.g. the 128 px replica's native size.
    smaller = load_params(compose(tmp_path, f"+experiment={name}", "preprocess.image_size=[128,128]", "train.epochs=3"))
    assert smaller.preprocess.image_size == [128, 128] and smaller.train.epochs == 3


def test_the_base_lists_every_key():
    """So that any key can be set with -S (Hydra refuses new keys) and `dvc exp show` fills every column."""
    data = yaml.safe_load((MODEL_DIR / "base.yaml").read_text())
    assert set(data["model"]) == set(ModelParams.model_fields)
    assert set(data["model"]["augmentation"]) == set(AugmentationParams.model_fields)
    assert set(data["train"]) == set(TrainParams.model_fields)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_every_preset_holds_only_its_differences(name):
    """Each key a preset sets changes what it inherits (the base, or the preset it builds on)."""
    own = yaml.safe_load((MODEL_DIR / f"{name}.yaml").read_text())
    (parent,) = [entry for entry in own.pop("defaults") if entry != "_self_"]
    inherited = leaves(preset(parent) if parent != "base" else yaml.safe_load((MODEL_DIR / "base.yaml").read_text()))
    repeated = sorted(key for key, value in leaves(own).items() if inherited[key] == value)
    assert not repeated, f"conf/model/{name}.yaml repeats what {parent} already says: {repeated}"
    composed = leaves(preset(name))
    assert set(composed) >= set(inherited) and all(composed[key] == value for key, value in leaves(own).items())


def layer_kinds(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def test_scratch_is_the_books_convnet():
    model = build_model(model_params("scratch"), BOOK_180, 2)
    # The book's summary of this model (listing 8.7): 991,041 parameters.
    assert model.count_params() == 991_041
    assert layer_kinds(model) == [
        "InputLayer",
        "Rescaling",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "Flatten",
        "Dense",
    ]
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [
        32,
        64,
        128,
        256,
        256,
    ]
    assert model.layers[-1].activation.__name__ == "sigmoid" and model.output_shape == (None, 1)
    train = TrainParams.model_validate(preset("scratch")["train"])
    assert (train.epochs, train.batch_size, train.optimizer) == (30, 32, "rmsprop")


def test_augmented_adds_the_books_augmentation_and_dropout():
    model = build_model(model_params("augmented"), BOOK_180, 2)
    assert model.count_params() == 991_041  # the same convnet
    kinds = layer_kinds(model)
    assert kinds[1:4] == ["RandomFlip", "RandomRotation", "RandomZoom"] and kinds[-2:] == ["Dropout", "Dense"]
    assert model.layers[1].mode == "horizontal"
    assert model.layers[2].factor == (-0.1, 0.1) and model.layers[3].height_factor == 0.2
    assert model.layers[-2].rate == 0.5
    assert TrainParams.model_validate(preset("augmented")["train"]).epochs == 100
    # Augmentation and dropout act in training only: prediction is deterministic.
    photos = np.random.default_rng(0).integers(0, 256, (4, *BOOK_180), dtype=np.uint8)
    np.testing.assert_array_equal(model.predict(photos, verbose=0), model.predict(photos, verbose=0))
    assert not np.allclose(model(photos, training=True), model(photos, training=True))


def test_mini_xception_has_residual_separable_blocks():
    model = build_model(model_params("mini_xception"), (128, 128, 3), 2)
    kinds = layer_kinds(model)
    assert kinds.count("SeparableConv2D") == 10 and kinds.count("BatchNormalization") == 10
    assert kinds.count("Add") == 5 and "GlobalAveragePooling2D" in kinds
    assert model.output_shape == (None, 1)


def test_record_is_mini_xception_with_the_training_ingredients(tmp_path):
    """The candidate recipe of issue 13: composes and validates as it is meant to run, at 128 px."""
    params = load_params(compose(tmp_path, "+experiment=record", "preprocess.image_size=[128,128]"))
    xception = model_params("mini_xception")
    assert params.model.model_dump(exclude={"augmentation"}) == xception.model_dump(exclude={"augmentation"})
    augmentation = params.model.augmentation
    assert augmentation.model_dump(exclude={"translation", "contrast"}) == xception.augmentation.model_dump(
        exclude={"translation", "contrast"}
    )
    assert augmentation.translation > 0 and augmentation.contrast > 0
    train = params.train
    assert (train.optimizer, train.lr_schedule, train.cpu_bfloat16, train.epochs) == ("adamw", "cosine", True, 100)
    assert train.weight_decay > 0 and 0 < train.warmup_epochs < train.epochs
    assert 0 < train.label_smoothing < 0.5 and 0 < train.mixup <= 1 and 0 < train.ema < 1
    assert params.evaluate.tta  # set by the experiment, on top of the model preset
    kinds = layer_kinds(build_model(params.model, (128, 128, 3), 2))
    assert kinds[1:6] == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"]
    # The test accuracy the preset's comment claims is the one the experiments' table gives it.
    claimed = re.search(r"test\s+(?:#\s*)?accuracy (0\.\d+)", (MODEL_DIR / "record.yaml").read_text())
    table = re.search(r"^\| `record`:.*\| (0\.\d+) \(one run", (REPO_ROOT / "docs/experiments.md").read_text(), re.M)
    assert claimed and table and claimed.group(1) == table.group(1)


def test_feature_extraction_is_vgg16_with_the_books_classifier():
    net = build_convnet(model_params("feature_extraction", weights="none"), BOOK_180, 2)
    assert net.base.name == "vgg16" and not net.base.trainable
    assert net.base.output.shape[1:] == (5, 5, 512)  # the book's feature maps at 180 px
    # The book's densely connected classifier on those features: 3,277,313 parameters.
    assert net.classifier.count_params() == 3_277_313
    assert layer_kinds(net.classifier)[1:] == ["Flatten", "Dense", "Dropout", "Dense"]
    assert sum(int(np.prod(w.shape)) for w in net.model.trainable_weights) == 3_277_313
    assert layer_kinds(net.model) == ["InputLayer", "VGG16Preprocess", "Functional", "Functional"]


def test_vgg16_preprocess_is_keras_own():
    from convnets.pretrained import VGG16Preprocess

    photos = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(photos.copy())
    np.testing.assert_allclose(VGG16Preprocess()(photos.astype("uint8")), expected, rtol=1e-6)


def test_fine_tuning_unfreezes_the_last_four_layers_of_the_base():
    from convnets.pretrained import set_trainable_layers
    from convnets.train import plan_phases

    params = Params.model_validate(
        {
            "model": {**preset("fine_tuning")["model"], "weights": "none"},
            "train": preset("fine_tuning")["train"],
            "preprocess": {"channels": 3, "image_size": [180, 180]},
        }
    )
    first, second = plan_phases(params.model, params.train)
    assert (first.start, first.end, first.trainable_layers, first.learning_rate) == (0, 50, 0, 0.001)
    assert (second.start, second.end, second.trainable_layers, second.learning_rate) == (50, 80, 4, 1e-5)
    net = build_convnet(params.model, BOOK_180, 2)
    set_trainable_layers(net.base, second.trainable_layers)
    trainable = sorted({w.path.split("/")[0] for w in net.base.trainable_weights})
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]  # block5_pool has no weights
    set_trainable_layers(net.base, 0)
    assert net.base.trainable_weights == []


@pytest.mark.parametrize(
    ("model", "train", "message"),
    [
        ({"cached_features": True}, {}, "needs a pretrained base"),
        (
            {"base": "vgg16", "cached_features": True, "augmentation": {"flip": "horizontal"}},
            {},
            "augmentation cannot apply",
        ),
        ({"trainable_layers": 2}, {}, "applies to a pretrained base"),
    ],
)
def test_inconsistent_model_params_name_the_key(tmp_path, model, train, message):
    from conftest import write_params

    path = write_params(tmp_path / "params.yaml", {"model": model, "train": train})
    with pytest.raises(ParamsError, match=message) as info:
        load_params(path)
    assert "model:" in str(info.value)


RGB = {"channels": 3, "image_size": [180, 180]}


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        ({"train": {"fine_tune_epochs": 5}}, "train.fine_tune_epochs, model.base, model.trainable_layers"),
        (
            {"model": {"base": "vgg16"}, "preprocess": RGB, "train": {"fine_tune_epochs": 5}},
            "train.fine_tune_epochs, model.base, model.trainable_layers",
        ),
        (
            {"model": {"base": "vgg16", "cached_features": True, "trainable_layers": 4}, "preprocess": RGB},
            "model.cached_features, model.trainable_layers, train.fine_tune_epochs",
        ),
    ],
)
def test_impossible_training_plans_are_refused_with_the_params(tmp_path, changes, keys):
    """Refused when params.yaml is read, so by the first stage, not by train after the data stages ran."""
    from conftest import write_params

    with pytest.raises(ParamsError, match=keys):
        load_params(write_params(tmp_path / "params.yaml", changes))


# --- pretrained weights ------------------------------------------------------------------


@pytest.fixture
def vgg16_weights_file(tmp_path) -> tuple[Path, keras.Model]:
    """A VGG16 no-top weights file in the format Keras publishes (legacy HDF5), random weights."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "served" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, base)
    return path, base


def same_weights(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def test_weights_from_a_local_file(vgg16_weights_file):
    from convnets.pretrained import vgg16_base

    path, original = vgg16_weights_file
    loaded = vgg16_base((64, 64, 3), str(path))  # any input size: the base is convolutional
    assert same_weights(loaded, original)


def test_imagenet_weights_download_once_into_keras_cache(vgg16_weights_file, tmp_path, monkeypatch):
    """The network boundary is the URL: a file:// URL serves the file; the second build reads the cache."""
    import convnets.pretrained as pretrained

    path, original = vgg16_weights_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(pretrained, "WEIGHTS_URL", path.as_uri())
    monkeypatch.setattr(pretrained, "WEIGHTS_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    assert same_weights(pretrained.vgg16_base((32, 32, 3), "imagenet"), original)
    assert (tmp_path / "keras-home" / "models" / pretrained.WEIGHTS_FILE).is_file()
    monkeypatch.setattr(pretrained, "WEIGHTS_URL", "file:///nonexistent/vgg16.h5")  # offline now
    assert same_weights(pretrained.vgg16_base((32, 32, 3), "imagenet"), original)


def test_no_weights_and_no_network_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    import convnets.pretrained as pretrained

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(pretrained, "WEIGHTS_URL", "file:///nonexistent/vgg16_notop.h5")
    with pytest.raises(DataError) as info:
        pretrained.vgg16_base((32, 32, 3), "imagenet")
    message = str(info.value)
    assert "could not download the VGG16 ImageNet weights" in message
    assert "file:///nonexistent/vgg16_notop.h5" in message
    assert str(tmp_path / "keras-home" / "models" / pretrained.WEIGHTS_FILE) in message
    assert "model.weights" in message


def test_a_missing_or_bad_weights_file_is_a_clear_error(tmp_path):
    from convnets.pretrained import WEIGHTS_FILE, vgg16_base

    with pytest.raises(DataError, match=f"not found.*{WEIGHTS_FILE}"):
        vgg16_base((32, 32, 3), str(tmp_path / "nope.h5"))
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot load VGG16 weights"):
        vgg16_base((32, 32, 3), str(bad))
    with pytest.raises(DataError, match="preprocess.channels: 3"):
        vgg16_base((32, 32, 1), "none")
