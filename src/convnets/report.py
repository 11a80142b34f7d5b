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
import base64
import html
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or workers
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import yaml

from convnets.cli import stage_main
from convnets.errors import DataError
from convnets.gradcam import HEATMAPS, as_rgb, display_scale, most_confident_mistakes, overlay, read_heatmaps, upscale
from convnets.layout import DEVICES_FILE, PREDICTIONS, TIMINGS
from convnets.layout import REPORT as PREPROCESS_REPORT
from convnets.outputs import staged_dir
from convnets.params import Params
from convnets.prepared import load_classes, load_subset

# PNGs without the Matplotlib version or a date in them: the same inputs give the same bytes.
PNG_METADATA = {"Software": None}
DPI = 110
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's presets (a stage runs from its root)

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


# --- reading what the other stages wrote -------------------------------------------------


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


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
    if history is None:
        raise DataError(f"{plots} holds no per-epoch metrics: run the train stage first (dvc repro train)")
    return history


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def load_presets(conf_dir: Path) -> tuple[dict, dict, dict, tuple[str, str]]:
    """(data set presets, model presets, config's own keys, (default data set, default model)) from conf/."""

    def resolved(group: str, name: str, seen: tuple = ()) -> dict:
        """A preset file with its own `defaults` (other presets of its group) merged in, flattened."""
        data = yaml.safe_load((conf_dir / group / f"{name}.yaml").read_text()) or {}
        own = flatten({k: v for k, v in data.items() if k != "defaults"})
        merged: dict = {}
        order = list(data.get("defaults") or [])
        if "_self_" not in order:
            order.append("_self_")
        for item in order:
            if item == "_self_":
                merged |= own
            elif isinstance(item, str) and item not in seen:
                merged |= resolved(group, item, (*seen, name))
        return merged

    def folder(group: str) -> dict[str, dict]:
        return {p.stem: resolved(group, p.stem) for p in sorted((conf_dir / group).glob("*.yaml"))}

    config = yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}
    defaults = {k: v for item in config.get("defaults", []) if isinstance(item, dict) for k, v in item.items()}
    own = {k: v for k, v in config.items() if k != "defaults"}
    return folder("dataset"), folder("model"), own, (defaults.get("dataset", ""), defaults.get("model", ""))


def identify_preset(params: dict, conf_dir: Path | None = None) -> dict:
    """The data set and model presets of conf/ closest to these params, and what differs from them.

    Returns {"dataset", "preset", "changed": [(key, value, preset's value)]}; the
    composition compared with is what `dvc exp run -S +experiment=<preset>` gives
    (the defaults for the MNIST convnet). Empty names when conf/ cannot be read.
    """
    conf_dir = Path(conf_dir or CONF_DIR)
    flat = flatten(params)
    try:
        datasets, models, own, (default_dataset, default_model) = load_presets(conf_dir)
    except (OSError, yaml.YAMLError):
        return {"dataset": "", "preset": "", "changed": []}

    def differences(reference: dict) -> list[tuple[str, object, object]]:
        keys = sorted(set(flat) | set(reference))
        return [(k, flat.get(k), reference.get(k)) for k in keys if flat.get(k) != reference.get(k)]

    best = None
    for dataset_name in sorted(datasets, key=lambda n: (n != default_dataset, n)):
        for model_name in sorted(models, key=lambda n: (n != default_model, n)):
            # Hydra's order: the data set, the model, then config.yaml's own keys (_self_ last).
            composed = datasets[dataset_name] | models[model_name] | flatten(own)
            changed = differences(composed)
            if best is None or len(changed) < len(best[2]):
                best = (dataset_name, model_name, changed)
    if best is None:
        return {"dataset": "", "preset": "", "changed": []}
    return {"dataset": best[0], "preset": best[1], "changed": best[2]}


def run_name(environ=os.environ) -> dict:
    """The experiment's name and the commit it is based on, as `dvc exp run` sets them.

    A plain `dvc repro` names neither: the page would otherwise change with every commit
    and make the report stage's output (and dvc.lock) differ for the same inputs.
    """
    commit = environ.get("DVC_EXP_BASELINE_REV", "")
    return {"experiment": environ.get("DVC_EXP_NAME", ""), "commit": commit[:7]}


def training_seconds(train_metrics: dict, timings: dict | None, epochs: int) -> tuple[float | None, bool]:
    """(seconds, exact?): a wall-clock total where one was recorded, else epochs x seconds_per_epoch."""
    for source in (timings or {}, train_metrics):
        for key in ("seconds", "total_seconds", "train_seconds", "wall_seconds", "wall_clock_seconds"):
            value = source.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value), True
    for source in (timings or {}, train_metrics):
        value = source.get("seconds_per_epoch")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value) * epochs, False
    return None, False


def format_duration(seconds: float | None, exact: bool = True) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
    return text if exact else f"≈ {text}"


def device_text(devices: dict) -> tuple[str, str]:
    """(device, precision) from data/train/devices.json; blanks when it is absent."""
    if not devices:
        return "", ""
    gpus = devices.get("gpus") or []
    where = ", ".join(map(str, gpus)) if gpus else "CPU"
    replicas = devices.get("replicas")
    if isinstance(replicas, int) and replicas > 1:
        where += f" ({replicas} replicas, {devices.get('strategy', '')})"
    return where, str(devices.get("dtype_policy", ""))


def environment_of(devices: dict | None) -> dict | None:
    """The environment that trained, from devices.json: {"lock", "python", "tensorflow", "keras"}.

    Records older than the lock name only TensorFlow and Keras (lock and Python are None then);
    None when devices.json names neither.
    """
    if not isinstance(devices, dict):
        return None
    env = devices.get("environment")
    if isinstance(env, dict):
        return {k: env.get(k) for k in ("lock", "python", "tensorflow", "keras")}
    if devices.get("tensorflow") or devices.get("keras"):
        return {"lock": None, "python": None, "tensorflow": devices.get("tensorflow"), "keras": devices.get("keras")}
    return None


def environment_text(env: dict | None) -> str:
    """e.g. "uv.lock 98dddbe733d1, Python 3.11.7, TensorFlow 2.21.0, Keras 3.15.1"; blank when unknown."""
    if not env:
        return ""
    lock = env.get("lock")
    if lock == "unlocked":
        parts = ["unlocked (not installed from uv.lock)"]
    else:
        parts = [f"uv.lock {lock}" if lock else "uv.lock not recorded"]
    for key, name in (("python", "Python"), ("tensorflow", "TensorFlow"), ("keras", "Keras")):
        if env.get(key):
            parts.append(f"{name} {env[key]}")
    return ", ".join(parts)


def trained_on(train_dir: Path, timings: dict | None) -> str:
    """When training finished, as the timings recorded it (`dvc exp run`); blank for a plain repro,
    whose outputs must not change with the day they were made."""
    value = (timings or {}).get("finished")
    return value if isinstance(value, str) else ""


# --- figures -------------------------------------------------------------------------------


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def plot_curve(
    history: pd.DataFrame,
    metric: str,
    path: Path,
    best_epoch: int | None = None,
    reference: tuple[float, str] | None = None,
) -> None:
    """The book's figure: training as dots, validation as a line, epochs from 1; best epoch and the book's figure."""
    fig, ax = plt.subplots(figsize=(5.6, 4), layout="constrained")
    epochs = history["epoch"] + 1
    ax.plot(epochs, history[metric], "bo", markersize=4, label=f"Training {metric}")
    ax.plot(epochs, history[f"val_{metric}"], "b", label=f"Validation {metric}")
    if best_epoch is not None:
        ax.axvline(best_epoch + 1, color="tab:green", linestyle=":", label=f"best epoch {best_epoch + 1}")
    if reference is not None:
        ax.axhline(reference[0], color="tab:red", linestyle="--", label=reference[1])
    ax.set(title=f"Training and validation {metric}", xlabel="Epoch", ylabel=metric.capitalize())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(predictions: pd.DataFrame, classes: list[str], path: Path) -> None:
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, predicted in zip(predictions["true"], predictions["predicted"]):
        counts[index[true], index[predicted]] += 1
    draw_confusion(counts, classes, path, "Confusion matrix (test)")


def draw_confusion(counts: np.ndarray, classes: list[str], path: Path, title: str, size: float = 4.6) -> None:
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    ax.imshow(counts, cmap="Blues")
    small = len(classes) > 6
    for (i, j), value in np.ndenumerate(counts):
        dark = value > counts.max() / 2
        ax.text(
            j, i, str(value), ha="center", va="center", fontsize=7 if small else 11, color="white" if dark else "black"
        )
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=0 if not small else 0, fontsize=8 if small else 10)
    ax.set_yticks(ticks, classes, fontsize=8 if small else 10)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    save_figure(fig, path)


def plot_roc(points: list[dict], auc: float | None, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4.6), layout="constrained")
    name = "model" if auc is None else f"model (AUC {auc:.3f})"
    ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], "b", label=name)
    ax.plot([0, 1], [0, 1], "k:", label="guessing")
    ax.set(
        title=f"ROC curve ({label})",
        xlabel="False positive rate",
        ylabel="True positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_precision_recall(points: list[dict], label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4.6), layout="constrained")
    ax.plot([p["recall"] for p in points], [p["precision"] for p in points], "b", label="model")
    ax.set(title=f"Precision-recall ({label})", xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


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


# --- the page -------------------------------------------------------------------------------


def data_uri(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def img(path: Path, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{data_uri(path)}">'


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def number(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def table(headers: list[str], rows: list[list], numeric_from: int = 1, cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(v)}</td>' if i >= numeric_from else f"<td>{esc(v)}</td>" for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


STYLE = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--soft:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);margin:0 auto;
max-width:78rem;padding:1rem clamp(.75rem,3vw,2rem)}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}h2{font-size:1.2rem;margin:1.8rem 0 .6rem;border-bottom:1px solid var(--line)}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:0}
.meta dt{color:var(--muted)}.meta dd{margin:0;overflow-wrap:anywhere}
code{font-size:.9em;background:var(--soft);padding:0 .25rem;border-radius:3px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.75rem;margin:1rem 0}
.card{border:1px solid var(--line);border-radius:8px;padding:.6rem .9rem;background:var(--soft)}
.card .label{color:var(--muted);font-size:.85rem}.card .value{font-size:1.8rem;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,22rem),1fr));gap:1rem;align-items:start}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,17rem),1fr));gap:1rem;align-items:start}
img{max-width:100%;height:auto;display:block}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.92rem;margin:.3rem 0 1rem}
th,td{padding:.25rem .7rem;border-bottom:1px solid var(--line);text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.mistakes{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,15rem),1fr));gap:.8rem}
.mistakes figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:.4rem;break-inside:avoid}
.mistakes img{width:100%;image-rendering:pixelated}
figcaption{font-size:.85rem;color:var(--muted);margin-top:.3rem}
.note{color:var(--muted);font-size:.9rem}
@media print{body{max-width:none;font-size:11pt;padding:0}h2{break-after:avoid}
.grid,.grid3{grid-template-columns:1fr 1fr}figure,.card,table,img{break-inside:avoid}
.scroll{overflow:visible}a{color:inherit;text-decoration:none}}
"""


def render_html(info: dict) -> str:
    header = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in info["header"])
    cards = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div>'
        f'<div class="value" id="{esc(key)}"{attrs}>{esc(value)}</div></div>'
        for key, label, value, attrs in info["cards"]
    )
    curves = "".join(f"<figure>{img(p, alt)}</figure>" for alt, p in info["curves"])
    diagnostics = "".join(f"<figure>{img(p, alt)}</figure>" for alt, p in info["diagnostics"])
    tiles = "".join(
        f"<figure>{img(t['path'], 'misclassified test photo ' + str(t['row']))}"
        f"<figcaption>true <b>{esc(t['true'])}</b>, predicted <b>{esc(t['predicted'])}</b> "
        f"({t['confidence']:.2f}){'' if t['heatmap'] else ' · no heatmap'}</figcaption></figure>"
        for t in info["tiles"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(info["title"])}</title><style>{STYLE}</style></head><body>
<h1>{esc(info["title"])}</h1>
<dl class="meta">{header}</dl>
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
</body></html>
"""


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
    predictions = pd.read_csv(eval_dir / PREDICTIONS, dtype={"true": str, "predicted": str})
    test = (read_json(eval_dir / "metrics.json", {}) or {}).get("test", {})
    train_metrics = read_json(train_dir / "metrics.json", {}) or {}
    devices = read_json(train_dir / DEVICES_FILE, {}) or {}
    preprocess_report = read_json(prepared_dir / PREPROCESS_REPORT, {}) or {}
    classes = load_classes(prepared_dir)
    images, _ = load_subset(prepared_dir, "test")
    layer, heatmaps = read_heatmaps(eval_dir / HEATMAPS)
    sklearn_plots = eval_dir / "plots" / "sklearn"

    raw_params = raw_params if raw_params is not None else params.model_dump(mode="json")
    preset = identify_preset(raw_params, conf_dir)
    run = run if run is not None else run_name()
    epochs = len(history)
    best = train_metrics.get("best", {}) if isinstance(train_metrics.get("best"), dict) else {}
    best_epoch = best.get("epoch") if isinstance(best.get("epoch"), int) else None
    seconds, exact = training_seconds(train_metrics, timings, epochs)
    device, precision = device_text(devices)
    reference = BOOK_ACCURACY.get((preset["dataset"], preset["preset"]))

    with staged_dir(out_dir) as tmp:
        curves = [("accuracy per epoch", tmp / "accuracy.png"), ("loss per epoch", tmp / "loss.png")]
        plot_curve(history, "accuracy", curves[0][1], best_epoch, reference)
        plot_curve(history, "loss", curves[1][1], best_epoch)
        diagnostics = [("confusion matrix", tmp / "confusion_matrix.png")]
        plot_confusion(predictions, classes, diagnostics[0][1])
        which = f"positive class {classes[1]}" if len(classes) == 2 else "micro-average"
        roc = (read_json(sklearn_plots / "roc.json", {}) or {}).get("roc")
        if roc:
            auc = (
                test.get("roc_auc")
                if len(classes) == 2
                else float(np.trapezoid([p["tpr"] for p in roc], [p["fpr"] for p in roc]))
            )
            diagnostics.append(("ROC curve", tmp / "roc.png"))
            plot_roc(roc, auc, which, diagnostics[-1][1])
        pr = (read_json(sklearn_plots / "precision_recall.json", {}) or {}).get("precision_recall")
        if pr:
            diagnostics.append(("precision-recall curve", tmp / "precision_recall.png"))
            plot_precision_recall(pr, which, diagnostics[-1][1])
        limit = params.report.misclassified_examples
        tiles = mistake_tiles(images, predictions, heatmaps, limit, tmp / "misclassified")
        wrong = int((predictions["true"] != predictions["predicted"]).sum())
        with_heatmap = sum(t["heatmap"] for t in tiles)
        note = (
            f"{len(tiles)} of {wrong} misclassified test photos shown, most confident mistakes first; "
            f"{with_heatmap} with the Grad-CAM heatmap of the predicted class"
            + (f" (layer {layer})" if layer else "")
            + ": red is where the model found the most evidence for it."
            if tiles
            else f"{wrong} misclassified test photos."
        )
        info = {
            "title": f"convnets report: {run.get('experiment') or run.get('commit') or 'workspace'}",
            "header": header_rows(
                run,
                preset,
                raw_params,
                preprocess_report,
                classes,
                train_dir,
                timings,
                device,
                precision,
                seconds,
                exact,
                environment_text(environment_of(devices)),
            ),
            "cards": headline_cards(test, classes, best_epoch, epochs),
            "per_class": per_class_table(test, predictions, classes),
            "curves": curves,
            "diagnostics": diagnostics,
            "tiles": tiles,
            "mistakes_note": note,
            "data_tables": data_tables(preprocess_report),
        }
        (tmp / "report.html").write_text(render_html(info))
    return Path(out_dir) / "report.html"


def header_rows(
    run,
    preset,
    raw_params,
    preprocess_report,
    classes,
    train_dir,
    timings,
    device,
    precision,
    seconds,
    exact,
    environment: str = "",
) -> list[tuple[str, str]]:
    fetch = raw_params.get("fetch", {}) if isinstance(raw_params.get("fetch"), dict) else {}
    size = preprocess_report.get("image_size") or raw_params.get("preprocess", {}).get("image_size")
    channels = preprocess_report.get("channels") or raw_params.get("preprocess", {}).get("channels")
    shape = f"{size[0]}×{size[1]}×{channels}" if isinstance(size, list) and len(size) == 2 else ""
    dataset = ", ".join(
        filter(None, [preset["dataset"] or "", f"source {fetch.get('source', '')}", shape, f"{len(classes)} classes"])
    )
    changed = ", ".join(f"<code>{esc(k)}={esc(json.dumps(v))}</code>" for k, v, _ in preset["changed"]) or "none"
    rows = [
        ("Experiment", esc(run.get("experiment")) or "— (a workspace run)"),
        ("Commit", esc(run.get("commit")) or "— (the workspace: see `git log -1`)"),
        ("Data set", esc(dataset)),
        ("Preset", esc(preset["preset"]) + (" (conf/model/)" if preset["preset"] else "")),
        ("Params changed from the preset", changed),
        ("Trained", esc(trained_on(train_dir, timings))),
        ("Device", esc(device)),
        ("Precision", esc(precision)),
        ("Environment", esc(environment)),
        ("Training time", esc(format_duration(seconds, exact))),
    ]
    return rows


def headline_cards(test: dict, classes: list[str], best_epoch: int | None, epochs: int) -> list[tuple]:
    def value_attr(value) -> str:
        return f' data-value="{value!r}"' if isinstance(value, (int, float)) else ""

    cards = [("test-accuracy", "Test accuracy", number(test.get("accuracy")), value_attr(test.get("accuracy")))]
    if len(classes) == 2:
        cards.append(("roc-auc", "ROC AUC", number(test.get("roc_auc")), value_attr(test.get("roc_auc"))))
    cards.append(("test-loss", "Test loss", number(test.get("loss")), value_attr(test.get("loss"))))
    best = f"{best_epoch + 1} of {epochs}" if best_epoch is not None else f"? of {epochs}"
    cards.append(("best-epoch", "Best epoch (lowest val loss)", best, ""))
    return cards


def per_class_table(test: dict, predictions: pd.DataFrame, classes: list[str]) -> str:
    per_class = test.get("per_class", {}) if isinstance(test.get("per_class"), dict) else {}
    support = predictions["true"].value_counts()
    rows = []
    for name in classes:
        figures = per_class.get(name, {})
        rows.append(
            [
                name,
                number(figures.get("precision"), 3),
                number(figures.get("recall"), 3),
                number(figures.get("f1-score"), 3),
                int(support.get(name, 0)),
            ]
        )
    rows.append(["macro F1", "", "", number(test.get("macro_f1"), 3), int(support.sum())])
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
    timings = read_json(TIMINGS) if Path(TIMINGS).is_file() else None
    path = report(
        params,
        args.prepared_dir,
        args.train_dir,
        args.eval_dir,
        args.out_dir,
        raw_params=raw,
        conf_dir=conf_dir if conf_dir.is_dir() else None,
        timings=timings if isinstance(timings, dict) else None,
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
