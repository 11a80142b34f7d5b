"""Grad-CAM: a heatmap per photo for the plain convnets, the residual mini-Xception and a VGG16 base."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from convnets.gradcam import (
    GradCam,
    heatmaps_for,
    most_confident_mistakes,
    overlay,
    read_heatmaps,
    save_overlay,
    write_heatmaps,
)
from convnets.models import build_model
from convnets.params import ModelParams

ARCHITECTURES = {
    "mnist-convnet": (ModelParams(), (28, 28, 1), 10, "conv2d", (11, 11)),
    "residual": (
        ModelParams(
            block="residual",
            stem_filters=8,
            conv_filters=[8, 16],
            pooled_blocks=2,
            pooling="global_average",
            dropout=0.5,
        ),
        (32, 32, 3),
        2,
        "add",
        (8, 8),
    ),
    "vgg16": (
        ModelParams(base="vgg16", weights="none", dense_units=[8], dropout=0.5, augmentation={"flip": "horizontal"}),
        (96, 96, 3),
        2,
        "block5_conv3",
        (6, 6),
    ),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_heatmaps_for_every_architecture(name):
    params, shape, classes, layer, size = ARCHITECTURES[name]
    model = build_model(params, shape, classes)
    images = np.random.default_rng(0).integers(0, 255, (6, *shape), dtype=np.uint8)
    used, maps, reasons = heatmaps_for(model, images, np.arange(6) % classes)
    assert used.startswith(layer)
    assert len(maps) == len(reasons) == 6
    computed = [m for m in maps if m is not None]
    assert computed, reasons  # random weights still find evidence for some class in some photo
    for heatmap in computed:
        assert heatmap.shape == size and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    for heatmap, reason in zip(maps, reasons):
        assert (heatmap is None) == bool(reason)


def test_the_heatmap_follows_the_evidence():
    """A model that scores the brightness of the top-left corner, shown a photo bright only there, looks there."""
    import keras

    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    x = keras.layers.Flatten()(x)
    kernel = np.zeros((256, 1), np.float32)
    kernel.reshape(16, 16)[:4, :4] = 1.0
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(kernel))(x)
    model = keras.Model(inputs, outputs)
    image = np.zeros((1, 16, 16, 1), np.uint8)
    image[0, :4, :4] = 100
    [heatmap] = GradCam(model).heatmaps(image, np.array([1]))
    assert heatmap[:4, :4].min() == pytest.approx(1.0) and heatmap[4:, :].max() == 0 and heatmap[:, 4:].max() == 0
    # The other class found no evidence in the photo: no heatmap rather than a misleading one.
    assert GradCam(model).heatmaps(image, np.array([0])) == [None]


def test_a_model_without_convolutions_gets_no_heatmaps():
    import keras

    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    layer, maps, reasons = heatmaps_for(model, np.zeros((2, 8, 8, 1), np.uint8), np.array([0, 1]))
    assert layer == "" and maps == [None, None] and all("no convolutional layer" in r for r in reasons)


def test_mistakes_are_chosen_the_same_way_everywhere():
    predictions = pd.DataFrame(
        {
            "row": [0, 1, 2, 3, 4],
            "true": list("aabab"),
            "predicted": list("abaab"),
            "confidence": [0.9, 0.8, 0.8, 0.99, 0.7],
        }
    )
    assert most_confident_mistakes(predictions, 5)["row"].tolist() == [1, 2]
    assert most_confident_mistakes(predictions, 1)["row"].tolist() == [1]


def test_heatmap_file_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "gradcam.json"
    write_heatmaps(path, "conv", [3, 5], [np.array([[0.0, 1.0]]), None], ["", "no evidence"])
    layer, maps = read_heatmaps(path)
    assert layer == "conv" and list(maps) == [3] and maps[3].tolist() == [[0.0, 1.0]]
    path.write_text("{not json")
    assert read_heatmaps(path) == ("", {})
    assert read_heatmaps(tmp_path / "absent.json") == ("", {})


def test_overlay_is_the_photo_with_the_heatmap_over_it(tmp_path):
    from PIL import Image

    gray = np.zeros((28, 28, 1), np.uint8)
    heatmap = np.zeros((3, 3))
    heatmap[0, 0] = 1.0
    out = overlay(gray, heatmap)
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[-1, -1, 0]  # hot (red) in the corner the heatmap names, cold elsewhere
    save_overlay(tmp_path / "a.png", gray, heatmap)
    save_overlay(tmp_path / "b.png", gray, None)
    with_map, without = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert with_map.width > 2 * without.width - 10 and with_map.height == without.height >= 128
    assert (tmp_path / "a.png").read_bytes() == (
        save_overlay(tmp_path / "c.png", gray, heatmap) or (tmp_path / "c.png").read_bytes()
    )
