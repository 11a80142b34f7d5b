"""Stage `report`: figures a person would rather look at, and one self-contained report.html.

Writes data/report/: accuracy.png and loss.png (training vs validation per
epoch, drawn as in the book), confusion_matrix.png, for two classes roc.png
(the ROC curve with its AUC), misclassified.png (a grid of the test photos
the model got wrong, most confident mistakes first, in colour for RGB data)
and report.html with every image inlined, so the file can be mailed or opened
anywhere.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or workers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay

from convnets.cli import stage_main
from convnets.errors import DataError
from convnets.layout import PREDICTIONS
from convnets.layout import REPORT as PREPROCESS_REPORT
from convnets.outputs import staged_dir
from convnets.params import Params
from convnets.prepared import load_classes, load_subset


def read_history(train_dir: str | Path) -> pd.DataFrame:
    """Per-epoch metrics from dvclive's TSVs: columns epoch, accuracy, loss, val_accuracy, val_loss."""
    plots = Path(train_dir) / "plots" / "metrics"
    if not plots.exists():
        raise DataError(f"{plots} not found: run the train stage first (dvc repro train)")
    history = None
    for split, prefix in (("train", ""), ("eval", "val_")):
        for tsv in sorted((plots / split).glob("*.tsv")):
            column = pd.read_csv(tsv, sep="\t").rename(columns={"step": "epoch", tsv.stem: prefix + tsv.stem})
            column = column[["epoch", prefix + tsv.stem]]
            history = column if history is None else history.merge(column, on="epoch")
    return history


def plot_curve(history: pd.DataFrame, metric: str, path: Path) -> None:
    """The book's figure: training as dots, validation as a line, epochs from 1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = history["epoch"] + 1
    ax.plot(epochs, history[metric], "bo", label=f"Training {metric}")
    ax.plot(epochs, history[f"val_{metric}"], "b", label=f"Validation {metric}")
    ax.set(title=f"Training and validation {metric}", xlabel="Epoch", ylabel=metric.capitalize())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(predictions: pd.DataFrame, classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ConfusionMatrixDisplay.from_predictions(
        predictions["true"], predictions["predicted"], labels=classes, ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(roc_points: list[dict], auc: float, positive: str, path: Path) -> None:
    """The ROC curve dvclive logged (evaluate), with the diagonal of guessing."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([p["fpr"] for p in roc_points], [p["tpr"] for p in roc_points], "b", label=f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", label="guessing")
    ax.set(title=f"ROC curve (test, positive class: {positive})", xlabel="False positive rate", ylabel="True positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(images: np.ndarray, predictions: pd.DataFrame, limit: int, path: Path) -> int:
    """Grid of up to `limit` wrong test predictions, most confident mistakes first."""
    wrong = predictions[predictions["true"] != predictions["predicted"]]
    wrong = wrong.sort_values("confidence", ascending=False).head(limit)
    cols = max(1, min(5, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, wrong.itertuples(index=False)):
        image = images[row.row]
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(f"true {row.true}\npred {row.predicted} ({row.confidence:.2f})", fontsize=9)
    if wrong.empty:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(wrong)


def inline_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def metrics_rows(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(metrics_rows(value, f"{name}/"))
        else:
            rows.append((name, f"{value:.4f}" if isinstance(value, float) else value))
    return rows


def render_html(metrics: dict, preprocess_report: dict, figures: dict[str, Path], shown_mistakes: int) -> str:
    table = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in metrics_rows(metrics))
    prep = html.escape(json.dumps(preprocess_report, indent=2, sort_keys=True))
    sections = "\n".join(f"<h2>{html.escape(title)}</h2>\n{inline_png(path)}" for title, path in figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>convnets report</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}td{{padding:.1rem .8rem}}
img{{max-width:100%}}pre{{background:#f4f4f4;padding:.5rem}}</style></head><body>
<h1>Training report</h1>
<h2>Test metrics</h2><table>{table}</table>
<h2>Preprocessing</h2><pre>{prep}</pre>
{sections}
<p>{shown_mistakes} misclassified test images shown, most confident first.</p>
</body></html>
"""


def report(params: Params, prepared_dir, train_dir, eval_dir, out_dir) -> Path:
    history = read_history(train_dir)
    eval_dir = Path(eval_dir)
    predictions = pd.read_csv(eval_dir / PREDICTIONS, dtype={"true": str, "predicted": str})
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    preprocess_report = json.loads((Path(prepared_dir) / PREPROCESS_REPORT).read_text())
    classes = load_classes(prepared_dir)
    images, _ = load_subset(prepared_dir, "test")
    with staged_dir(out_dir) as tmp:
        figures = {
            "Accuracy per epoch": tmp / "accuracy.png",
            "Loss per epoch": tmp / "loss.png",
            "Confusion matrix (test)": tmp / "confusion_matrix.png",
        }
        plot_curve(history, "accuracy", figures["Accuracy per epoch"])
        plot_curve(history, "loss", figures["Loss per epoch"])
        plot_confusion(predictions, classes, figures["Confusion matrix (test)"])
        roc = eval_dir / "plots" / "sklearn" / "roc.json"
        if len(classes) == 2 and roc.exists():
            figures["ROC curve (test)"] = tmp / "roc.png"
            points = json.loads(roc.read_text())["roc"]
            plot_roc(points, metrics["test"]["roc_auc"], classes[1], figures["ROC curve (test)"])
        figures["Misclassified test images"] = tmp / "misclassified.png"
        shown = plot_misclassified(images, predictions, params.report.misclassified_examples, figures["Misclassified test images"])
        (tmp / "report.html").write_text(render_html(metrics, preprocess_report, figures, shown))
    return Path(out_dir) / "report.html"


def _run(params: Params, args: argparse.Namespace) -> None:
    path = report(params, args.prepared_dir, args.train_dir, args.eval_dir, args.out_dir)
    print(f"report: open {path} in a browser")


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [
            ("prepared_dir", "preprocessed arrays (data/prepared)"),
            ("train_dir", "training metrics (data/train)"),
            ("eval_dir", "evaluation outputs (data/eval)"),
            ("out_dir", "output folder (data/report)"),
        ],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
