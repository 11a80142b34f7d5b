"""Stage `evaluate`: measure the saved model on the test split.

Writes data/eval/ with dvclive: metrics.json (test accuracy and loss,
per-class precision/recall/F1, ROC AUC for two classes), plots/sklearn/*.json
(confusion matrix; ROC and precision-recall for two classes) and
predictions.csv (one row per test image) for the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from dvclive import Live
from sklearn.metrics import accuracy_score, classification_report, log_loss, roc_auc_score

from convnets.cli import stage_main
from convnets.datasets import load_classes, load_subset
from convnets.errors import DataError
from convnets.outputs import staged_dir
from convnets.params import Params
from convnets.train import MODEL_FILE

PREDICTIONS = "predictions.csv"


def load_model(model_dir: str | Path) -> keras.Model:
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise DataError(f"{path} not found: run the train stage first (dvc repro train)")
    return keras.models.load_model(path)


def class_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities [n, classes]; a sigmoid output becomes two columns (p(0), p(1))."""
    probs = model.predict(images, batch_size=batch_size, verbose=0)
    if probs.shape[1] == 1:
        probs = np.hstack([1.0 - probs, probs])
    return probs


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
        metrics["roc_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    return metrics


def evaluate(params: Params, prepared_dir, model_dir, out_dir) -> dict:
    images, labels = load_subset(prepared_dir, "test")
    classes = load_classes(prepared_dir)
    model = load_model(model_dir)
    probs = class_probabilities(model, np.asarray(images), params.evaluate.batch_size)
    metrics = compute_metrics(labels, probs, classes)
    with staged_dir(out_dir) as tmp:
        live = Live(dir=str(tmp), dvcyaml=None, save_dvc_exp=False, report=None)
        log_nested(live, "test", metrics)
        names = np.asarray(classes)
        live.log_sklearn_plot("confusion_matrix", names[labels], names[probs.argmax(axis=1)], name="confusion_matrix.json")
        if len(classes) == 2:
            live.log_sklearn_plot("roc", labels, probs[:, 1], name="roc.json")
            live.log_sklearn_plot("precision_recall", labels, probs[:, 1], name="precision_recall.json")
        live.end()
        predictions_table(labels, probs, classes).to_csv(tmp / PREDICTIONS, index=False)
    return metrics


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
