"""Where the convnet looked: Grad-CAM heatmaps (the book's chapter 9 recipe) and their overlays.

The heatmap of a photo is the last convolutional feature map, each channel
weighted by the mean gradient of the predicted class's score over it, ReLU'd and
scaled to [0, 1]. The score is the output layer's pre-activation (the logit), not
the probability: a confident sigmoid or softmax saturates in float32 and its
gradient vanishes, which would blank the heatmaps of exactly the most confident
mistakes the report shows.

It works for the three kinds of model `models.py` builds:

- the plain convnets: the feature map is the last Conv2D's output;
- the residual mini-Xception: the last residual `add` (the map the classifier pools);
- a VGG16 base nested in the model: its last Conv2D (`block5_conv3`), reached by
  running the model's layers one after the other around the base.

A last feature map smaller than 5x5 (the MNIST convnet's 3x3) shows nothing a
person can read; the last convolution before it that is at least 5x5 is used.

TensorFlow is imported inside the functions that need it: the report stage uses
the TensorFlow-free parts of this module (selection of the photos, the JSON file,
the overlay), and must start without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HEATMAPS = "gradcam.json"  # in data/eval: {"layer": ..., "photos": [{"row", "heatmap" | "error"}]}

MIN_SIDE = 5  # a coarser last feature map (MNIST's convnet ends at 3x3) gives way to the one before it
_CONV_KINDS = ("Conv1D", "Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Add")


def most_confident_mistakes(predictions, limit: int):
    """The wrong rows of predictions.csv, most confident first (ties: by row); evaluate and report agree on it."""
    wrong = predictions[predictions["true"] != predictions["predicted"]]
    return wrong.sort_values(["confidence", "row"], ascending=[False, True], kind="mergesort").head(limit)


# --- heatmaps (TensorFlow) ---------------------------------------------------------------


def _is_feature_layer(layer) -> bool:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    return type(layer).__name__ in _CONV_KINDS and shape is not None and len(shape) == 4


def _pick(layers):
    """The last feature map, unless it is too coarse to show anything (MNIST's 3x3).

    Then the last one of 5x5 or more.
    """
    fine = [layer for layer in layers if min(layer.output.shape[1], layer.output.shape[2]) >= MIN_SIDE]
    last = layers[-1]
    return last if min(last.output.shape[1], last.output.shape[2]) >= MIN_SIDE or not fine else fine[-1]


def _output_dense(model):
    """The Dense output layer (sigmoid or softmax), looking inside a nested classifier model."""
    import keras

    layer = model.layers[-1]
    while isinstance(layer, keras.Model):
        layer = layer.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(f"the model's output layer is a {type(layer).__name__}, not a Dense classifier")
    return layer


class GradCam:
    """Grad-CAM for one model: `heatmaps(images, classes)` -> per photo a [h, w] array in [0, 1] or None."""

    def __init__(self, model):
        import keras

        self.model = model
        self._compiled = None
        self.dense = _output_dense(model)
        self.sigmoid = self.dense.units == 1
        top = [layer for layer in model.layers if _is_feature_layer(layer)]
        if top:
            self.layer = _pick(top)
            self._forward = keras.Model(model.inputs, [self.layer.output, self.dense.input])
            return
        # A pretrained base nested as one layer: run the outer layers in a chain around it.
        nested = [
            layer
            for layer in model.layers
            if isinstance(layer, keras.Model) and any(_is_feature_layer(inner) for inner in layer.layers)
        ]
        if not nested:
            raise ValueError("the model has no convolutional layer")
        base = nested[-1]
        self.layer = _pick([inner for inner in base.layers if _is_feature_layer(inner)])
        inner = keras.Model(base.inputs, [self.layer.output, base.output])
        head = model.layers[-1]
        pre_output = keras.Model(head.inputs, self.dense.input) if isinstance(head, keras.Model) else None
        chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]

        def forward(x):
            feature_map = None
            for layer in chain:
                if layer is base:
                    feature_map, x = inner(x, training=False)
                elif layer is head and pre_output is not None:
                    x = pre_output(x, training=False)
                elif layer is self.dense:
                    break
                else:
                    x = layer(x, training=False)
            return feature_map, x

        self._forward = forward

    @property
    def layer_name(self) -> str:
        return self.layer.name

    def _cams(self, x, classes):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            feature_map, hidden = self._forward(x)
            feature_map = tf.cast(feature_map, tf.float32)
            logits = tf.matmul(tf.cast(hidden, tf.float32), tf.cast(self.dense.kernel, tf.float32))
            if self.dense.use_bias:
                logits = logits + tf.cast(self.dense.bias, tf.float32)
            if self.sigmoid:
                # One logit: "dog"'s score is the logit, "cat"'s its negative.
                scores = logits[:, 0] * tf.where(classes == 1, 1.0, -1.0)
            else:
                scores = tf.gather(logits, classes, axis=1, batch_dims=1)
            total = tf.reduce_sum(scores)
        grads = tape.gradient(total, feature_map)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(feature_map * weights, axis=-1))

    def heatmaps(self, images: np.ndarray, classes: np.ndarray) -> list[np.ndarray | None]:
        """Heatmaps of `classes[i]` for `images[i]` (uint8 batch, the model's input size)."""
        import tensorflow as tf

        if self._compiled is None:
            # In a graph: eager gradients through SeparableConv2D crash TensorFlow's oneDNN CPU kernels.
            self._compiled = tf.function(self._cams, reduce_retracing=True)
        cams = self._compiled(tf.convert_to_tensor(np.asarray(images)), tf.constant(np.asarray(classes), tf.int32))
        out: list[np.ndarray | None] = []
        for cam in cams.numpy().astype(np.float64):
            peak = cam.max()
            out.append(cam / peak if np.isfinite(peak) and peak > 0 else None)
        return out


def heatmaps_for(
    model, images: np.ndarray, classes, batch_size: int = 32
) -> tuple[str, list[np.ndarray | None], list[str]]:
    """(layer name, heatmap or None per photo, why not per photo) without ever raising for one photo."""
    try:
        cam = GradCam(model)
    except Exception as exc:  # an architecture Grad-CAM cannot read: every photo without a heatmap
        return "", [None] * len(images), [f"no heatmap: {exc}"] * len(images)
    maps: list[np.ndarray | None] = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        try:
            maps += cam.heatmaps(chunk, np.asarray(classes[start : start + batch_size]))
        except Exception:  # one bad batch: try its photos one by one
            for i in range(len(chunk)):
                try:
                    maps += cam.heatmaps(chunk[i : i + 1], np.asarray(classes[start + i : start + i + 1]))
                except Exception:
                    maps.append(None)
    reasons = ["" if m is not None else "nothing in the photo raises the predicted class's score" for m in maps]
    return cam.layer_name, maps, reasons


# --- the file evaluate writes and the report reads ----------------------------------------


def write_heatmaps(path: Path, layer: str, rows, maps, reasons) -> None:
    photos = []
    for row, heatmap, reason in zip(rows, maps, reasons):
        if heatmap is None:
            photos.append({"row": int(row), "error": reason or "no heatmap"})
        else:
            photos.append({"row": int(row), "heatmap": np.round(heatmap, 3).tolist()})
    Path(path).write_text(json.dumps({"layer": layer, "photos": photos}, separators=(",", ":")) + "\n")


def read_heatmaps(path: Path) -> tuple[str, dict[int, np.ndarray]]:
    """(layer, {test row: heatmap}); an absent or unreadable file gives no heatmaps."""
    try:
        data = json.loads(Path(path).read_text())
        maps = {
            int(photo["row"]): np.asarray(photo["heatmap"], dtype=np.float64)
            for photo in data.get("photos", [])
            if "heatmap" in photo
        }
        return str(data.get("layer", "")), {row: m for row, m in maps.items() if m.ndim == 2 and m.size}
    except (OSError, ValueError, TypeError, KeyError):
        return "", {}


# --- overlays (NumPy, Pillow, a Matplotlib colour map) -------------------------------------


def display_scale(height: int, width: int, target: int = 128) -> int:
    """Integer upscaling so that small images (MNIST's 28 px) are seen, not squinted at."""
    return max(1, math.ceil(target / max(1, min(height, width))))


def as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image.astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, scale: int = 1) -> np.ndarray:
    """The book's superimposition: the heatmap in the jet colour map, resized to the photo, 40 % over it."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = upscale(as_rgb(image), scale)
    height, width = rgb.shape[:2]
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize((width, height), Image.BILINEAR)
    colours = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255
    return np.uint8(np.clip(rgb * (1 - alpha) + colours * alpha, 0, 255))


def upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else rgb


def save_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray | None) -> None:
    """The photo and, when there is a heatmap, its overlay to the right; a PNG without dates."""
    from PIL import Image

    rgb = as_rgb(image)
    scale = display_scale(*rgb.shape[:2])
    panels = [upscale(rgb, scale)]
    if heatmap is not None:
        panels.append(overlay(rgb, heatmap, scale=scale))
    gap = np.full((panels[0].shape[0], 4 if len(panels) > 1 else 0, 3), 255, np.uint8)
    tile = np.concatenate([panels[0], gap, *panels[1:]], axis=1) if len(panels) > 1 else panels[0]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tile).save(path, format="PNG", optimize=True)


def write_mistake_heatmaps(model, images, predictions, classes: list[str], limit: int, path: Path) -> int:
    """Grad-CAM of the predicted class for the `limit` most confident test mistakes; returns how many have one."""
    chosen = most_confident_mistakes(predictions, limit)
    rows = chosen["row"].to_numpy(dtype=np.int64)
    index = {name: i for i, name in enumerate(classes)}
    predicted = np.asarray([index[str(name)] for name in chosen["predicted"]], dtype=np.int64)
    layer, maps, reasons = heatmaps_for(model, np.asarray(images[rows]) if len(rows) else images[:0], predicted)
    write_heatmaps(path, layer, rows, maps, reasons)
    return sum(m is not None for m in maps)
