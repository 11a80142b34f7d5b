"""How report.html and compare.html look: style, escaping, numbers and durations, the charts, the header.

Pages are self-contained (every chart inlined as a PNG, nothing fetched) and
byte-stable: a chart is drawn at a fixed DPI and saved without the Matplotlib
version or a date, so the same figures give the same bytes. The confusion matrix,
ROC and precision-recall curves are scikit-learn's displays; the training curves
are the book's figure.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or workers
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

# PNGs without the Matplotlib version or a date in them: the same inputs give the same bytes.
PNG_METADATA = {"Software": None}
DPI = 110
MANY_CLASSES = 6  # above this, a confusion matrix's numbers and labels get a smaller font

# --- numbers and words ------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def number(value, digits: int = 4) -> str:
    """A figure to `digits` decimals; blank for anything that is not a finite number."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:.{digits}f}" if finite else ""


def format_duration(seconds: float | None, exact: bool = True) -> str:
    """e.g. "1 h 02 min", "1 min 15 s", "6 s"; "≈ " before an estimate; blank when unknown."""
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
    return text if exact else f"≈ {text}"


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


def device_text(devices: dict | None) -> tuple[str, str]:
    """(device, precision) from data/train/devices.json; blanks when it is absent."""
    if not devices:
        return "", ""
    gpus = devices.get("gpus") or []
    where = ", ".join(map(str, gpus)) if gpus else "CPU"
    replicas = devices.get("replicas")
    if isinstance(replicas, int) and replicas > 1:
        where += f" ({replicas} replicas, {devices.get('strategy', '')})"
    return where, str(devices.get("dtype_policy", ""))


# --- the header -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunHeader:
    """What ran, as a report's header says it; blanks for what the run does not know."""

    experiment: str = ""
    commit: str = ""
    dataset: str = ""  # e.g. "mnist, source keras, 28×28×1, 10 classes"
    preset: str = ""
    changed: Sequence[tuple[str, object, object]] = ()  # (param, its value, the preset's value)
    trained: str = ""  # when training finished
    device: str = ""
    precision: str = ""
    environment: str = ""
    training_seconds: float | None = None
    training_exact: bool = True  # a measured total, not an estimate


def header_rows(header: RunHeader) -> list[tuple[str, str]]:
    """(label, HTML) for each line of the header, in the page's order."""
    changed = ", ".join(f"<code>{esc(k)}={esc(json.dumps(v))}</code>" for k, v, _ in header.changed)
    return [
        ("Experiment", esc(header.experiment) or "— (a workspace run)"),
        ("Commit", esc(header.commit) or "— (the workspace: see `git log -1`)"),
        ("Data set", esc(header.dataset)),
        ("Preset", esc(header.preset) + (" (conf/model/)" if header.preset else "")),
        ("Params changed from the preset", changed or "none"),
        ("Trained", esc(header.trained)),
        ("Device", esc(header.device)),
        ("Precision", esc(header.precision)),
        ("Environment", esc(header.environment)),
        ("Training time", esc(format_duration(header.training_seconds, header.training_exact))),
    ]


# --- HTML -------------------------------------------------------------------------------------


def data_uri(source: bytes | Path) -> str:
    """An inline image: PNG bytes, or a .png or .jpg file."""
    kind = "jpeg" if isinstance(source, Path) and source.suffix == ".jpg" else "png"
    data = source.read_bytes() if isinstance(source, Path) else source
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def img(alt: str, source: bytes | Path) -> str:
    return f'<img alt="{esc(alt)}" src="{data_uri(source)}">'


def table(headers: list[str], rows: list[list], numeric_from: int = 1, cls: str = "") -> str:
    """A scrollable table; the columns from `numeric_from` on are numbers, right-aligned."""
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


def html_page(title: str, body: str, style: str = "") -> str:
    """A whole page: the shared style (plus the page's own), the title as heading, then `body`."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}{style}</style></head><body>
<h1>{esc(title)}</h1>
{body}</body></html>
"""


# --- charts -----------------------------------------------------------------------------------


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (fixed DPI, no metadata that changes), and closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return buffer.getvalue()


def curve_png(history, metric: str, best_epoch: int | None = None, reference: tuple[float, str] | None = None) -> bytes:
    """The book's figure: training as dots, validation as a line; the best epoch and the book's figure marked.

    `history` has an epoch column (from 1, figures.read_history) and `metric`, `val_<metric>`.
    """
    fig, ax = plt.subplots(figsize=(5.6, 4), layout="constrained")
    ax.plot(history["epoch"], history[metric], "bo", markersize=4, label=f"Training {metric}")
    ax.plot(history["epoch"], history[f"val_{metric}"], "b", label=f"Validation {metric}")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="tab:green", linestyle=":", label=f"best epoch {best_epoch}")
    if reference is not None:
        ax.axhline(reference[0], color="tab:red", linestyle="--", label=reference[1])
    ax.set(title=f"Training and validation {metric}", xlabel="Epoch", ylabel=metric.capitalize())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return png_bytes(fig)


def overlay_png(series: Sequence[tuple[str, object]], metric: str) -> bytes:
    """Validation `metric` of several runs on one chart (the book compares its runs so): (name, epoch/metric frame)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    for name, frame in series:
        ax.plot(frame["epoch"], frame[metric], label=name, linewidth=1.4)
    if not series:
        ax.text(0.5, 0.5, "no per-epoch metrics in the DVC cache", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=f"Validation {metric}", xlabel="Epoch", ylabel=metric.capitalize())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if series:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    return png_bytes(fig)


def confusion_png(true: Sequence[str], predicted: Sequence[str], labels: list[str], title: str, size: float) -> bytes:
    """Counts of (true, predicted) labels as scikit-learn draws a confusion matrix, in blues."""
    # scikit-learn (1.4 s to import) where it draws: leaderboards and tables import this module too.
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    small = len(labels) > MANY_CLASSES
    ConfusionMatrixDisplay.from_predictions(
        true, predicted, labels=labels, ax=ax, cmap="Blues", colorbar=False, text_kw={"fontsize": 7 if small else 11}
    )
    ax.tick_params(labelsize=8 if small else 10)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return png_bytes(fig)


def roc_png(points: list[dict], auc: float | None, label: str) -> bytes:
    """An ROC curve from DVCLive's points ({"fpr", "tpr"}), with guessing's diagonal; the area
    under the points when no `auc` is given (a micro-average)."""
    from sklearn.metrics import RocCurveDisplay
    from sklearn.metrics import auc as area

    fig, ax = plt.subplots(figsize=(4.6, 4.6), layout="constrained")
    # Arrays: a list would be one curve per element to scikit-learn.
    fpr, tpr = np.array([p["fpr"] for p in points]), np.array([p["tpr"] for p in points])
    curve = RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=area(fpr, tpr) if auc is None else auc, name="model")
    curve.plot(ax=ax, plot_chance_level=True, chance_level_kw={"label": "guessing"})
    ax.set(title=f"ROC curve ({label})", xlabel="False positive rate", ylabel="True positive rate")
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def precision_recall_png(points: list[dict], label: str) -> bytes:
    """A precision-recall curve from DVCLive's points ({"precision", "recall"})."""
    from sklearn.metrics import PrecisionRecallDisplay

    fig, ax = plt.subplots(figsize=(4.6, 4.6), layout="constrained")
    precision, recall = np.array([p["precision"] for p in points]), np.array([p["recall"] for p in points])
    curve = PrecisionRecallDisplay(precision=precision, recall=recall, name="model")
    curve.plot(ax=ax)
    ax.set(title=f"Precision-recall ({label})", xlabel="Recall", ylabel="Precision")
    ax.legend(loc="lower left", fontsize=8)
    return png_bytes(fig)
