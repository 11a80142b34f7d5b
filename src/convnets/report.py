"""Stage `report`: one run on one page, data/report/report.html, self-contained and readable anywhere.

The page says what ran (experiment or commit, data set, preset, the params that
differ from the preset, date, device and precision, the environment: the uv.lock
hash and the Python, TensorFlow and Keras versions, training time), then the
headline figures (test accuracy, ROC AUC for two classes, loss, best epoch of N),
tables (per class; the data kept, set aside and converted), the training curves
side by side in the book's style (the best epoch marked, the book's accuracy as a
dashed line for its presets), the confusion matrix with the ROC and
precision-recall curves, and the most confident mistakes with the Grad-CAM
heatmap `evaluate` computed for them.

Every image is inlined, nothing is fetched: the file can be mailed, opened on a
phone, or printed to PDF. The charts are also written next to it as PNGs. The
stage needs neither TensorFlow nor another stage's module, and writes the same
bytes for the same inputs (no dates of its own, fixed order).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from convnets.cli import stage_main
from convnets.figures import Figures, environment_of, read_figures, read_history, read_json
from convnets.gradcam import HEATMAPS, as_rgb, display_scale, most_confident_mistakes, overlay, read_heatmaps, upscale
from convnets.layout import DEVICES_FILE, PREDICTIONS, TIMINGS
from convnets.layout import REPORT as PREPROCESS_REPORT
from convnets.outputs import staged_dir
from convnets.params import Params
from convnets.prepared import load_classes, load_subset
from convnets.presentation import (
    RunHeader,
    confusion_png,
    curve_png,
    device_text,
    environment_text,
    esc,
    header_rows,
    html_page,
    img,
    number,
    precision_recall_png,
    roc_png,
    table,
)
from convnets.presets import identify_preset, load_presets

# The book's test accuracy for its experiments, keyed by (data set preset, model preset).
BOOK_ACCURACY = {
    ("mnist", "mnist_convnet"): (0.991, "the book, full MNIST: 0.991"),
    ("dogs_vs_cats", "scratch"): (0.71, "the book: ~0.71"),
    ("dogs_vs_cats", "augmented"): (0.83, "the book: ~0.83"),
    ("dogs_vs_cats", "feature_extraction"): (0.975, "the book: ~0.975"),
    ("dogs_vs_cats", "feature_extraction_augmented"): (0.977, "the book: ~0.977"),
    ("dogs_vs_cats", "fine_tuning"): (0.985, "the book: ~0.985"),
    ("dogs_vs_cats", "mini_xception"): (0.90, "the book (ch. 9, 180 px): ~0.90"),
}


def run_name(environ=os.environ) -> dict:
    """The experiment's name and the commit it is based on, as `dvc exp run` sets them.

    A plain `dvc repro` names neither: the page would otherwise change with every commit
    and make the report stage's output (and dvc.lock) differ for the same inputs.
    """
    commit = environ.get("DVC_EXP_BASELINE_REV", "")
    return {"experiment": environ.get("DVC_EXP_NAME", ""), "commit": commit[:7]}


# --- the page -------------------------------------------------------------------------------


def mistake_tiles(
    images: np.ndarray, predictions: pd.DataFrame, heatmaps: dict[int, np.ndarray], limit: int, out_dir: Path
) -> list[dict]:
    """The most confident mistakes as small images: the photo, and its Grad-CAM overlay when there is one."""
    from PIL import Image

    tiles = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for n, row in enumerate(most_confident_mistakes(predictions, limit).itertuples(index=False), start=1):
        image = np.asarray(images[int(row.row)])
        rgb = as_rgb(image)
        scale = display_scale(*rgb.shape[:2])
        panels = [upscale(rgb, scale)]
        heatmap = heatmaps.get(int(row.row))
        if heatmap is not None:
            panels += [np.full((panels[0].shape[0], 4, 3), 255, np.uint8), overlay(rgb, heatmap, scale=scale)]
        tile = np.concatenate(panels, axis=1)
        photo = image.shape[-1] == 3 and min(image.shape[:2]) >= 64
        # Photos compress ten times better as JPEG; small gray digits stay sharp as PNG.
        path = out_dir / f"{n:03d}.{'jpg' if photo else 'png'}"
        if photo:
            Image.fromarray(tile).save(path, format="JPEG", quality=85)
        else:
            Image.fromarray(tile).save(path, format="PNG", optimize=True)
        tiles.append(
            {
                "path": path,
                "row": int(row.row),
                "true": row.true,
                "predicted": row.predicted,
                "confidence": float(row.confidence),
                "heatmap": heatmap is not None,
            }
        )
    return tiles


def render_html(info: dict) -> str:
    header = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in info["header"])
    cards = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div>'
        f'<div class="value" id="{esc(key)}"{attrs}>{esc(value)}</div></div>'
        for key, label, value, attrs in info["cards"]
    )
    curves = "".join(f"<figure>{img(alt, path)}</figure>" for alt, path in info["curves"])
    diagnostics = "".join(f"<figure>{img(alt, path)}</figure>" for alt, path in info["diagnostics"])
    tiles = "".join(
        f"<figure>{img('misclassified test photo ' + str(t['row']), t['path'])}"
        f"<figcaption>true <b>{esc(t['true'])}</b>, predicted <b>{esc(t['predicted'])}</b> "
        f"({t['confidence']:.2f}){'' if t['heatmap'] else ' · no heatmap'}</figcaption></figure>"
        for t in info["tiles"]
    )
    body = f"""<dl class="meta">{header}</dl>
<div class="cards">{cards}</div>
<h2>Per class (test)</h2>
{info["per_class"]}
<h2>Training curves</h2>
<div class="grid">{curves}</div>
<h2>Confusion matrix, ROC and precision-recall</h2>
<div class="grid3">{diagnostics}</div>
<h2>Misclassified test photos</h2>
<p class="note">{esc(info["mistakes_note"])}</p>
<div class="mistakes">{tiles}</div>
<h2>The data</h2>
<div class="grid">{info["data_tables"]}</div>
"""
    return html_page(info["title"], body)


# --- the stage ------------------------------------------------------------------------------


def report(
    params: Params,
    prepared_dir,
    train_dir,
    eval_dir,
    out_dir,
    *,
    raw_params: dict | None = None,
    conf_dir: Path | None = None,
    timings: dict | None = None,
    run: dict | None = None,
) -> Path:
    prepared_dir, train_dir, eval_dir = Path(prepared_dir), Path(train_dir), Path(eval_dir)
    history = read_history(train_dir)
    figures = read_figures(train_dir, eval_dir, timings)
    predictions = pd.read_csv(eval_dir / PREDICTIONS, dtype={"true": str, "predicted": str})
    devices = read_json(train_dir / DEVICES_FILE, {})
    preprocess_report = read_json(prepared_dir / PREPROCESS_REPORT, {})
    classes = load_classes(prepared_dir)
    raw_params = raw_params if raw_params is not None else params.model_dump(mode="json")
    preset = identify_preset(raw_params, load_presets(conf_dir))
    run = run if run is not None else run_name()
    epochs = figures.epochs or len(history)
    device, precision = device_text(devices)
    header = RunHeader(
        experiment=run.get("experiment") or "",
        commit=run.get("commit") or "",
        dataset=dataset_text(preset["dataset"], raw_params, preprocess_report, classes),
        preset=preset["preset"],
        changed=preset["changed"],
        trained=figures.finished,
        device=device,
        precision=precision,
        environment=environment_text(environment_of(devices)),
        training_seconds=figures.training_seconds,
        training_exact=figures.training_exact,
    )
    with staged_dir(out_dir) as tmp:
        reference = BOOK_ACCURACY.get((preset["dataset"], preset["preset"]))
        tiles, note = mistakes(prepared_dir, eval_dir, predictions, params.report.misclassified_examples, tmp)
        info = {
            "title": f"convnets report: {run.get('experiment') or run.get('commit') or 'workspace'}",
            "header": header_rows(header),
            "cards": headline_cards(figures, len(classes) == 2, epochs),
            "per_class": per_class_table(figures, predictions, classes),
            "curves": write_curves(tmp, history, figures.best_epoch, reference),
            "diagnostics": write_diagnostics(tmp, predictions, classes, figures, eval_dir / "plots" / "sklearn"),
            "tiles": tiles,
            "mistakes_note": note,
            "data_tables": data_tables(preprocess_report),
        }
        (tmp / "report.html").write_text(render_html(info))
    return Path(out_dir) / "report.html"


def dataset_text(name: str, raw_params: dict, preprocess_report: dict, classes: list[str]) -> str:
    """e.g. "mnist, source keras, 28×28×1, 10 classes"."""
    fetch = raw_params.get("fetch", {}) if isinstance(raw_params.get("fetch"), dict) else {}
    size = preprocess_report.get("image_size") or raw_params.get("preprocess", {}).get("image_size")
    channels = preprocess_report.get("channels") or raw_params.get("preprocess", {}).get("channels")
    shape = f"{size[0]}×{size[1]}×{channels}" if isinstance(size, list) and len(size) == 2 else ""
    return ", ".join(filter(None, [name, f"source {fetch.get('source', '')}", shape, f"{len(classes)} classes"]))


def write_png(path: Path, png: bytes) -> Path:
    path.write_bytes(png)
    return path


def write_curves(folder: Path, history: pd.DataFrame, best_epoch: int | None, reference) -> list[tuple[str, Path]]:
    """Accuracy (with the book's figure for its presets) and loss per epoch, as PNGs in `folder`."""
    return [
        (
            "accuracy per epoch",
            write_png(folder / "accuracy.png", curve_png(history, "accuracy", best_epoch, reference)),
        ),
        ("loss per epoch", write_png(folder / "loss.png", curve_png(history, "loss", best_epoch))),
    ]


def write_diagnostics(
    folder: Path, predictions: pd.DataFrame, classes: list[str], figures: Figures, sklearn_plots: Path
) -> list[tuple[str, Path]]:
    """The confusion matrix, and the ROC and precision-recall curves evaluate logged, as PNGs in `folder`."""
    matrix = confusion_png(predictions["true"], predictions["predicted"], classes, "Confusion matrix (test)", 4.6)
    charts = [("confusion matrix", write_png(folder / "confusion_matrix.png", matrix))]
    which = f"positive class {classes[1]}" if len(classes) == 2 else "micro-average"
    roc = read_json(sklearn_plots / "roc.json", {}).get("roc")
    if roc:
        auc = figures.roc_auc if len(classes) == 2 else None  # None: the area under the micro-averaged points
        charts.append(("ROC curve", write_png(folder / "roc.png", roc_png(roc, auc, which))))
    pr = read_json(sklearn_plots / "precision_recall.json", {}).get("precision_recall")
    if pr:
        charts.append(
            ("precision-recall curve", write_png(folder / "precision_recall.png", precision_recall_png(pr, which)))
        )
    return charts


def mistakes(
    prepared_dir: Path, eval_dir: Path, predictions: pd.DataFrame, limit: int, folder: Path
) -> tuple[list[dict], str]:
    """The tiles of the most confident mistakes (in folder/misclassified) and the note above them."""
    images, _ = load_subset(prepared_dir, "test")
    layer, heatmaps = read_heatmaps(eval_dir / HEATMAPS)
    tiles = mistake_tiles(images, predictions, heatmaps, limit, folder / "misclassified")
    wrong = int((predictions["true"] != predictions["predicted"]).sum())
    if not tiles:
        return tiles, f"{wrong} misclassified test photos."
    with_heatmap = sum(t["heatmap"] for t in tiles)
    return tiles, (
        f"{len(tiles)} of {wrong} misclassified test photos shown, most confident mistakes first; "
        f"{with_heatmap} with the Grad-CAM heatmap of the predicted class"
        + (f" (layer {layer})" if layer else "")
        + ": red is where the model found the most evidence for it."
    )


def headline_cards(figures: Figures, two_classes: bool, epochs: int) -> list[tuple]:
    """(id, label, shown value, attributes): test accuracy, ROC AUC (two classes), test loss, best epoch."""
    shown = [("test-accuracy", "Test accuracy", figures.test_accuracy)]
    if two_classes:
        shown.append(("roc-auc", "ROC AUC", figures.roc_auc))
    shown.append(("test-loss", "Test loss", figures.test_loss))
    cards = [
        (key, label, number(value), "" if value is None else f' data-value="{value!r}"') for key, label, value in shown
    ]
    best = figures.best_epoch if figures.best_epoch is not None else "?"
    return [*cards, ("best-epoch", "Best epoch (lowest val loss)", f"{best} of {epochs}", "")]


def per_class_table(figures: Figures, predictions: pd.DataFrame, classes: list[str]) -> str:
    support = predictions["true"].value_counts()
    rows = []
    for name in classes:
        scores = figures.per_class.get(name, {})
        rows.append(
            [
                name,
                number(scores.get("precision"), 3),
                number(scores.get("recall"), 3),
                number(scores.get("f1-score"), 3),
                int(support.get(name, 0)),
            ]
        )
    rows.append(["macro F1", "", "", number(figures.macro_f1, 3), int(support.sum())])
    return table(["class", "precision", "recall", "F1", "support"], rows)


def data_tables(preprocess_report: dict) -> str:
    kept = preprocess_report.get("kept", {}) or {}
    kept_rows = [[subset, count] for subset, count in kept.items()] + [["total", sum(kept.values())]]
    reasons = preprocess_report.get("rejected_by_reason", {}) or {}
    reason_rows = [[reason, count] for reason, count in reasons.items()] or [["none", 0]]
    converted = preprocess_report.get("converted", {}) or {}
    converted_rows = [[what, count] for what, count in converted.items()] or [["none", 0]]
    return (
        f"<div><h3>Kept per subset</h3>{table(['subset', 'photos'], kept_rows)}</div>"
        f"<div><h3>Set aside, by reason</h3>{table(['reason', 'files'], reason_rows)}</div>"
        f"<div><h3>Conversions made (kept)</h3>{table(['conversion', 'photos'], converted_rows)}</div>"
    )


def _run(params: Params, args: argparse.Namespace) -> None:
    params_file = Path(args.params)
    raw = yaml.safe_load(params_file.read_text()) if params_file.is_file() else None
    conf_dir = params_file.resolve().parent / "conf"
    path = report(
        params,
        args.prepared_dir,
        args.train_dir,
        args.eval_dir,
        args.out_dir,
        raw_params=raw,
        conf_dir=conf_dir if conf_dir.is_dir() else None,
        timings=read_json(TIMINGS),
    )
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
