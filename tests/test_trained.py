"""The saved model: bytes that depend only on its architecture and weights; loading and output columns."""

from __future__ import annotations

import json
import time
import zipfile

import numpy as np
import pytest

from convnets.errors import DataError
from convnets.trained import ZIP_EPOCH, class_columns, load_trained, save_model


def small_model(seed: int):
    import keras

    # Seeded initializers rather than keras.utils.set_random_seed: no global state for later tests.
    init = keras.initializers.GlorotUniform(seed=seed)
    # Layers that share one dtype policy object: Keras numbers it by its address in memory.
    policy = keras.DTypePolicy("float32")
    inputs = keras.Input((4,), name="x")  # names fixed: Keras numbers default names per process
    hidden = keras.layers.Dense(3, dtype=policy, kernel_initializer=init, name="hidden")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype=policy, kernel_initializer=init, name="p")(hidden)
    return keras.Model(inputs, outputs, name="m")


def test_shared_objects_are_numbered_in_order():
    from convnets.trained import renumber_shared_objects

    config = {
        "a": {"shared_object_id": 140502763078800},
        "b": [{"shared_object_id": 99}, {"shared_object_id": 140502763078800}],
    }
    assert renumber_shared_objects(config, {}) == {
        "a": {"shared_object_id": 1},
        "b": [{"shared_object_id": 2}, {"shared_object_id": 1}],
    }


def test_same_weights_give_the_same_bytes(tmp_path):
    first, second = small_model(0), small_model(0)  # equal weights, shared objects at other addresses
    save_model(first, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras writes the save time to the second
    save_model(second, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.keras") as saved:
        assert {info.date_time for info in saved.infolist()} == {ZIP_EPOCH}
        assert "date_saved" not in json.loads(saved.read("metadata.json"))
        assert '"shared_object_id": 1' in saved.read("config.json").decode()
    save_model(small_model(1), tmp_path / "c.keras")
    assert (tmp_path / "c.keras").read_bytes() != (tmp_path / "a.keras").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_saved_model_loads_with_its_classes(tmp_path):
    model = small_model(0)
    save_model(model, tmp_path / "model.keras")
    (tmp_path / "classes.json").write_text('["cat", "dog"]\n')
    loaded, classes = load_trained(tmp_path)
    x = np.ones((3, 4), np.float32)
    assert classes == ["cat", "dog"]
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))
    (tmp_path / "classes.json").write_text('["a", "b", "c"]\n')
    with pytest.raises(DataError, match="1 output"):
        load_trained(tmp_path)


def test_class_columns():
    np.testing.assert_allclose(class_columns(np.array([[0.25]], np.float32)), [[0.75, 0.25]])
    softmax = np.array([[0.1, 0.2, 0.7]], np.float32)
    assert class_columns(softmax).dtype == np.float64 and class_columns(softmax).shape == (1, 3)
