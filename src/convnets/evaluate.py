"""Stage `evaluate`: measure the saved model on the test split.

Writes data/eval/ with dvclive: metrics.json (test accuracy and loss,
per-class precision/recall/F1; for two classes also ROC AUC and the precision
and recall of the second class, "dog" for dogs vs. cats; tta: 1 when
evaluate.tta averaged each photo with its mirror image, else 0), plots/sklearn/*.json
(confusion matrix; ROC and precision-recall curves, of the second class
for two classes, micro-averaged one-vs-rest for more; dvc.yaml draws them)
and predictions.csv (one row per test image) for the report.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import pandas as pd
from dvclive import Live
from sklearn.metrics import accuracy_score, classification_report, log_loss, roc_auc_score

from convnets.cli import stage_main
from convnets.datasets import mirrored, ordered_batches
from convnets.errors import DataError
from convnets.gradcam import HEATMAPS, write_mistake_heatmaps
from convnets.layout import PREDICTIONS
from convnets.outputs import staged_dir
from convnets.params import Params
from convnets.prepared import load_classes, load_subset
from convnets.trained import class_columns, load_trained


def class_probabilities(model: keras.Model, images: np.ndarray, batch_size: int, tta: bool = False) -> np.ndarray:
    """Probabilities [n, classes]; a sigmoid output becomes two columns (p(0), p(1)).

    The images stream from the (memory-mapped) array batch by batch, so the
    test set never has to fit in memory at once. With `tta`, each photo's
    probabilities are the mean of its own and its left-right mirror image's.
    """
    batches = ordered_batches(images, batch_size=batch_size)
    probs = class_columns(model.predict(batches, verbose=0))
    if tta:
        probs = (probs + class_columns(model.predict(mirrored(batches), verbose=0))) / 2
    # float32 softmax rows sum to 1 only within float32's precision; sklearn checks in float64.
    return probs / probs.sum(axis=1, keepdims=True)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    predicted = probs.argmax(axis=1)
    ids = list(range(len(classes)))
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "loss": float(log_loss(labels, probs, labels=ids)),
    }
    report = classification_report(
        labels, predicted, labels=ids, target_names=classes, output_dict=True, zero_division=0
    )
    metrics["per_class"] = {
        name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score")} for name in classes
    }
    metrics["macro_f1"] = float(report["macro avg"]["f1-score"])
    if len(classes) == 2:
        # Top-level copies of the positive (second) class's figures, for `dvc exp show` columns.
        metrics["roc_auc"] = float(roc_auc_score(labels, probs[:, 1])) if len(set(labels)) == 2 else float("nan")
        metrics["precision"] = metrics["per_class"][classes[1]]["precision"]
        metrics["recall"] = metrics["per_class"][classes[1]]["recall"]
    return metrics


def evaluate(params: Params, prepared_dir, model_dir, out_dir) -> dict:
    images, labels = load_subset(prepared_dir, "test")
    classes = load_classes(prepared_dir)
    model, _ = load_trained(model_dir)
    if model.input_shape[1:] != images.shape[1:]:
        raise DataError(
            f"the model takes images of shape {model.input_shape[1:]} but data/prepared holds "
            f"{images.shape[1:]}: rerun the train stage on these data (dvc repro)"
        )
    probs = class_probabilities(model, images, params.evaluate.batch_size, params.evaluate.tta)
    # A number, not a string: DVC metrics are numbers, and `dvc exp show` then tells the runs apart.
    metrics = {**compute_metrics(labels, probs, classes), "tta": int(params.evaluate.tta)}
    with staged_dir(out_dir) as tmp:
        live = Live(dir=str(tmp), dvcyaml=None, save_dvc_exp=False, report=None)
        log_nested(live, "test", metrics)
        names = np.asarray(classes)
        live.log_sklearn_plot(
            "confusion_matrix", names[labels], names[probs.argmax(axis=1)], name="confusion_matrix.json"
        )
        truth, scores = curve_inputs(labels, probs)
        live.log_sklearn_plot("roc", truth, scores, name="roc.json")
        live.log_sklearn_plot("precision_recall", truth, scores, name="precision_recall.json")
        live.end()
        predictions = predictions_table(labels, probs, classes)
        predictions.to_csv(tmp / PREDICTIONS, index=False)
        # Where the model looked in the mistakes the report shows (the report itself runs without TensorFlow).
        write_mistake_heatmaps(model, images, predictions, classes, params.evaluate.heatmaps, tmp / HEATMAPS)
    return metrics


def curve_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is positive, score) pairs for the ROC and precision-recall curves.

    Two classes: the second class is the positive one. More classes: every
    (image, class) pair one-vs-rest, which gives sklearn's micro-averaged curves;
    dvc.yaml then draws the same plots for every data set.
    """
    if probs.shape[1] == 2:
        return labels, probs[:, 1]
    onehot = np.eye(probs.shape[1], dtype=np.int64)[labels]
    return onehot.ravel(), probs.ravel()


def log_nested(live: Live, prefix: str, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            log_nested(live, f"{prefix}/{key}", value)
        else:
            live.log_metric(f"{prefix}/{key}", value, plot=False)


def predictions_table(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    predicted = probs.argmax(axis=1)
    return pd.DataFrame(
        {
            "row": np.arange(len(labels)),
            "true": np.asarray(classes)[labels],
            "predicted": np.asarray(classes)[predicted],
            "confidence": probs[np.arange(len(labels)), predicted].round(6),
        }
    )


def _run(params: Params, args: argparse.Namespace) -> None:
    metrics = evaluate(params, args.prepared_dir, args.model_dir, args.out_dir)
    print(f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} -> {args.out_dir}")


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [
            ("prepared_dir", "preprocessed arrays (data/prepared)"),
            ("model_dir", "trained model (data/model)"),
            ("out_dir", "output folder (data/eval)"),
        ],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
