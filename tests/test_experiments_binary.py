"""Two-class train -> evaluate -> report on synthetic photos, and the VGG16 wiring with weights=None."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, precision_score, recall_score, roc_auc_score

from convnets.evaluate import curve_inputs, evaluate
from convnets.params import Params
from convnets.report import report
from convnets.train import train
from test_train_pipeline import PREPARED_PREPROCESS, make_prepared


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    prepared = make_prepared(root / "prepared", sizes=(96, 48, 64))
    # A cat drawn as a dog and a dog as a cat: the report always has mistakes to show.
    labels = np.load(prepared / "test_labels.npy")
    labels[:2] = 1 - labels[:2]
    np.save(prepared / "test_labels.npy", labels)
    params = Params.model_validate(
        {
            "model": {
                "augmentation": {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1},
                "conv_filters": [8, 16],
                "pooled_blocks": 2,
                "dropout": 0.3,
            },
            "train": {"epochs": 3, "batch_size": 16},
            "report": {"misclassified_examples": 8},
        }
    )
    train(params, prepared, root / "model", root / "train")
    metrics = evaluate(params, prepared, root / "model", root / "eval")
    html = report(params, prepared, root / "train", root / "eval", root / "report")
    return {"root": root, "metrics": metrics, "html": html}


def test_binary_metrics_agree_with_the_predictions(binary_run):
    root, metrics = binary_run["root"], binary_run["metrics"]
    labels = np.load(root / "prepared" / "test_labels.npy")
    model = keras.models.load_model(root / "model" / "model.keras")
    p_dog = model.predict(np.load(root / "prepared" / "test_images.npy"), verbose=0)[:, 0]
    predicted = (p_dog > 0.5).astype(int)
    assert metrics["accuracy"] == pytest.approx((predicted == labels).mean())
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, p_dog), abs=1e-6)
    assert metrics["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predicted, zero_division=0))
    assert metrics["roc_auc"] > 0.8  # the bright square is easy to learn: a broken pipeline would not get there
    logged = json.loads((root / "eval" / "metrics.json").read_text())["test"]
    assert {"accuracy", "loss", "roc_auc", "precision", "recall"} <= set(logged)


def test_binary_plots_are_written_for_dvc(binary_run):
    root = binary_run["root"]
    plots = root / "eval" / "plots" / "sklearn"
    roc = json.loads((plots / "roc.json").read_text())["roc"]
    assert roc[0]["fpr"] == 0 and roc[-1]["tpr"] == 1 and {"fpr", "tpr", "threshold"} <= set(roc[0])
    pr = json.loads((plots / "precision_recall.json").read_text())["precision_recall"]
    assert {"precision", "recall"} <= set(pr[0])
    cells = json.loads((plots / "confusion_matrix.json").read_text())
    cells = cells if isinstance(cells, list) else next(iter(cells.values()))
    predictions = pd.read_csv(root / "eval" / "predictions.csv")
    assert len(cells) == len(predictions) == 64
    expected = confusion_matrix(predictions["true"], predictions["predicted"], labels=["cat", "dog"])
    counted = pd.crosstab(pd.Series([c["actual"] for c in cells]), pd.Series([c["predicted"] for c in cells]))
    assert (
        counted.reindex(index=["cat", "dog"], columns=["cat", "dog"], fill_value=0).to_numpy().tolist()
        == expected.tolist()
    )


def test_dvc_yaml_draws_the_binary_plots(repo_root):
    import yaml

    plots = yaml.safe_load((repo_root / "dvc.yaml").read_text())["plots"]
    sources = {title: list(spec["y"]) for entry in plots for title, spec in entry.items()}
    assert sources["ROC curve (test)"] == ["data/eval/plots/sklearn/roc.json"]
    assert sources["Precision-recall curve (test)"] == ["data/eval/plots/sklearn/precision_recall.json"]
    assert "Confusion matrix (test)" in sources and "Accuracy per epoch" in sources


def test_report_shows_roc_and_the_misclassified_photos_in_colour(binary_run):
    from PIL import Image

    html = binary_run["html"].read_text()
    folder = binary_run["html"].parent
    assert html.count('src="data:image/png;base64,') >= 5  # curves, confusion matrix, ROC, PR, mistakes
    assert "ROC curve" in html and "Misclassified test photos" in html
    wrong = pd.read_csv(binary_run["root"] / "eval" / "predictions.csv").query("true != predicted")
    assert len(wrong) >= 2  # the fixture's relabelled photos at least
    assert f"{min(len(wrong), 8)} of {len(wrong)} misclassified test photos shown" in html
    tiles = sorted((folder / "misclassified").iterdir())
    assert len(tiles) == min(len(wrong), 8)
    # RGB photos stay in colour (a grayscale rendering would have R == G == B everywhere).
    photo = np.asarray(Image.open(tiles[0]).convert("RGB")).astype(int)
    photo = photo[:, : photo.shape[0]]  # the photo itself, left of its heatmap
    assert (np.abs(photo[..., 0] - photo[..., 2]) > 10).mean() > 0.01
    assert (folder / "roc.png").stat().st_size > 1000


def test_curves_for_many_classes_are_micro_averaged():
    labels = np.array([0, 2, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    truth, scores = curve_inputs(labels, probs)
    assert truth.tolist() == [1, 0, 0, 0, 0, 1, 0, 1, 0] and scores.tolist() == probs.ravel().tolist()
    truth, scores = curve_inputs(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert truth.tolist() == [0, 1] and scores.tolist() == [0.1, 0.8]


@pytest.mark.parametrize("cached", [True, False], ids=["features-computed-once", "augmentation-through-the-base"])
def test_feature_extraction_trains_evaluates_and_reloads(tmp_path, cached):
    """Experiment 3's two variants with VGG16 weights=None (no download): the full wiring."""
    prepared = make_prepared(tmp_path / "prepared", sizes=(32, 16, 16))
    augmentation = {} if cached else {"flip": "horizontal", "rotation": 0.1, "zoom": 0.2}
    params = Params.model_validate(
        {
            "model": {
                "base": "vgg16",
                "weights": "none",
                "cached_features": cached,
                "augmentation": augmentation,
                "dense_units": [16],
                "dropout": 0.5,
            },
            "preprocess": PREPARED_PREPROCESS,
            "train": {"epochs": 2, "batch_size": 16},
        }
    )
    best = train(params, prepared, tmp_path / "model", tmp_path / "train")
    metrics = evaluate(params, prepared, tmp_path / "model", tmp_path / "eval")
    model = keras.models.load_model(tmp_path / "model" / "model.keras")
    assert [type(layer).__name__ for layer in model.layers][-3:] == ["VGG16Preprocess", "Functional", "Functional"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    assert best["epoch"] in (0, 1)
    # The saved model computes what it computed in training: rerunning it gives the same val loss.
    x_val = np.load(prepared / "val_images.npy")
    y_val = np.load(prepared / "val_labels.npy")
    p = np.clip(model.predict(x_val, verbose=0)[:, 0].astype(np.float64), 1e-7, 1 - 1e-7)
    val_loss = -np.mean(y_val * np.log(p) + (1 - y_val) * np.log(1 - p))
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-3)
