"""The names of the files stages hand to each other, and where machine-local caches live.

One small module with no heavy imports, so that a stage reading another
stage's output needs neither that stage's module nor what it imports (DVC
would otherwise have to rerun it whenever that code changes, and `report`
would load TensorFlow to learn a file name).
"""

from __future__ import annotations

import os
from pathlib import Path

# fetch -> data/raw/
IMAGES_DIR = "images"  # images/<label>/<file>
CATALOG = "catalog.csv"  # file,label,index
SET_ASIDE = "set_aside.csv"  # file,label,reason,detail
SET_ASIDE_COLUMNS = ["file", "label", "reason", "detail"]

# split -> data/split/
MANIFEST = "manifest.csv"  # file,label,index,split
SUBSETS = ("train", "val", "test")

# preprocess -> data/prepared/
CLASSES = "classes.json"  # sorted class names; also in data/model/
REPORT = "report.json"
REJECTED = "rejected.csv"


def images_file(subset: str) -> str:
    return f"{subset}_images.npy"  # uint8 [n, height, width, channels]


def labels_file(subset: str) -> str:
    return f"{subset}_labels.npy"  # int64 [n]


# train -> data/model/, data/train/ (dvclive)
MODEL_FILE = "model.keras"
DEVICES_FILE = "devices.json"
STOPPED = "stopped.json"  # in data/train, only when train.stop_at_epoch ended a run early (its state kept)

# evaluate -> data/eval/ (dvclive)
PREDICTIONS = "predictions.csv"  # row,true,predicted,confidence

# Wall-clock figures: a git-ignored file that dvc.yaml lists as a metric (not an output).
TIMINGS = Path("timings") / "train.json"


# Where the train stage mirrors its epoch state for a retry on another machine (convnets.resume);
# the Prefect worker flows set it beside the DVC remote (pipeline.workspace).
RESUME_URL_ENV = "CONVNETS_RESUME_URL"


def user_cache_dir() -> Path:
    """Machine-local state outside the repo: $XDG_CACHE_HOME/convnets, else ~/.cache/convnets."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convnets"


def resume_states_dir() -> Path:
    """Where train keeps an unfinished run's state (convnets.resume), and pipeline.clean removes old ones:
    named here because importing resume loads Keras."""
    return user_cache_dir() / "train-resume"


def downloads_dir() -> Path:
    """Kaggle and URL downloads of the fetch stage, kept across runs (as Keras keeps ~/.keras)."""
    return user_cache_dir() / "downloads"
