"""One reader of a run's figures: what `train` and `evaluate` wrote, as every page and table counts it.

A run leaves data/train/metrics.json (DVCLive's summary: the last `step`, the `best`
epoch, device counts), data/train/plots/metrics/{train,eval}/<metric>.tsv (per epoch),
data/train/devices.json (device names, the environment), data/eval/metrics.json
(`test`) and, under `dvc exp run`, timings/train.json (wall clock). The report reads
them in the workspace, compare through `dvc exp show` and DVC's file system at each
experiment's commit, the sweep in a finished run's clone (read_run).

Epochs count from 1 here, as the book and Keras's progress bar count them; DVCLive's
`step`, and so `best.epoch`, count from 0. epoch_of_step is the one place that adds 1.
No pandas at import: the sweep reads the metrics alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from convnets.errors import DataError
from convnets.layout import DEVICES_FILE, TIMINGS

# A run's files, relative to its checkout (dvc.yaml's outs and metrics).
TRAIN_DIR = "data/train"
TRAIN_METRICS = f"{TRAIN_DIR}/metrics.json"
EVAL_METRICS = "data/eval/metrics.json"
DEVICES = f"{TRAIN_DIR}/{DEVICES_FILE}"
TIMINGS_FILE = TIMINGS.as_posix()
HISTORY = Path("plots") / "metrics"  # under the train folder: <split>/<metric>.tsv
SPLITS = {"train": "", "eval": "val_"}  # DVCLive's folders, and their columns' prefix (Keras's names)


def read_json(path: str | Path, default=None):
    """A JSON file's content; `default` when it is absent or unreadable (a failed or older run)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def finite(value) -> float | None:
    """A number a metric can show: not a bool, not NaN or infinite; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def epoch_of_step(step) -> int | None:
    """Epoch n, counted from 1, of DVCLive's step n - 1; None for anything but a whole number."""
    value = finite(step)
    return int(value) + 1 if value is not None and float(value).is_integer() else None


@dataclass(frozen=True)
class Figures:
    """A run's headline figures; None (or empty) for what it did not record."""

    test_accuracy: float | None = None
    roc_auc: float | None = None
    test_loss: float | None = None
    macro_f1: float | None = None
    per_class: dict = field(default_factory=dict)  # class -> {"precision", "recall", "f1-score", ...}
    best_epoch: int | None = None  # counted from 1: the epoch whose weights were kept
    epochs: int | None = None
    training_seconds: float | None = None
    training_exact: bool = False  # a wall-clock total, not seconds per epoch x epochs
    finished: str = ""  # when training finished (timings; `dvc exp run` only)
    gpu_count: int | None = None
    mixed_precision: bool = False
    val_loss: float | None = None  # of the best epoch: what a halving sweep ranks by (never a test figure)
    val_accuracy: float | None = None

    def headline(self) -> dict[str, float | int | None]:
        """The figures a sweep's tables and artifacts carry, by their names there."""
        return {
            "test_accuracy": self.test_accuracy,
            "roc_auc": self.roc_auc,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
        }


def section(data, key: str) -> dict:
    """data[key] when both are dicts (a file that errored or predates the key gives {})."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def figures_of(train: dict | None, evaluation: dict | None, timings: dict | None = None) -> Figures:
    """The figures in the content of data/train/metrics.json, data/eval/metrics.json and timings/train.json."""
    train = train if isinstance(train, dict) else {}
    timings = timings if isinstance(timings, dict) else {}
    test, devices = section(evaluation, "test"), section(train, "devices")
    epochs = epoch_of_step(train.get("step"))
    seconds, exact = training_seconds(train, timings, epochs)
    gpus = finite(devices.get("gpu_count"))
    finished = timings.get("finished")
    return Figures(
        test_accuracy=finite(test.get("accuracy")),
        roc_auc=finite(test.get("roc_auc")),
        test_loss=finite(test.get("loss")),
        macro_f1=finite(test.get("macro_f1")),
        per_class=section(test, "per_class"),
        best_epoch=epoch_of_step(section(train, "best").get("epoch")),
        epochs=epochs,
        training_seconds=seconds,
        training_exact=exact,
        finished=finished if isinstance(finished, str) else "",
        gpu_count=int(gpus) if gpus is not None else None,
        mixed_precision=bool(finite(devices.get("mixed_precision"))),
        val_loss=finite(section(train, "best").get("val_loss")),
        val_accuracy=finite(section(train, "best").get("val_accuracy")),
    )


def training_seconds(train: dict, timings: dict | None, epochs: int | None) -> tuple[float | None, bool]:
    """(seconds, exact?): the wall-clock total where one was recorded, else seconds per epoch
    (timings, or the train metrics of older commits) x epochs."""
    timings = timings or {}
    total = finite(timings.get("seconds"))
    if total is not None:
        return float(total), True
    for source in (timings, train):
        per_epoch = finite(source.get("seconds_per_epoch"))
        if per_epoch is not None and epochs:
            return float(per_epoch) * epochs, False
    return None, False


def read_figures(train_dir: str | Path, eval_dir: str | Path, timings: dict | None = None) -> Figures:
    """The figures of the train and evaluate stages' output folders (the report stage's inputs)."""
    return figures_of(read_json(Path(train_dir) / "metrics.json"), read_json(Path(eval_dir) / "metrics.json"), timings)


def read_run(checkout: str | Path) -> Figures:
    """The figures of a finished run in its checkout (blank where a file is absent)."""
    root = Path(checkout)
    return figures_of(read_json(root / TRAIN_METRICS), read_json(root / EVAL_METRICS), read_json(root / TIMINGS_FILE))


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


# --- per epoch ---------------------------------------------------------------------------------


def read_series(source, metric: str):
    """One DVCLive TSV (a path or an open file) as a DataFrame: epoch (from 1) and `metric`."""
    import pandas as pd

    frame = pd.read_csv(source, sep="\t")
    return pd.DataFrame({"epoch": frame["step"].map(epoch_of_step), metric: frame[metric]})


def read_history(train_dir: str | Path):
    """Per-epoch metrics of the train folder: columns epoch (from 1), accuracy, loss, val_accuracy, val_loss."""
    plots = Path(train_dir) / HISTORY
    columns = [
        read_series(tsv, tsv.stem).rename(columns={tsv.stem: prefix + tsv.stem})
        for split, prefix in SPLITS.items()
        for tsv in sorted((plots / split).glob("*.tsv"))
    ]
    if not columns:
        raise DataError(f"{plots} holds no per-epoch metrics: run the train stage first (dvc repro train)")
    return reduce(lambda history, column: history.merge(column, on="epoch"), columns)
