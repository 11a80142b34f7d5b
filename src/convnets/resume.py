"""Resumable training: what a killed `train` stage needs to go on from its last finished epoch.

DVC deletes a stage's declared outputs before it reruns it, and train builds
its outputs in temporary folders, so the state lives in a separate folder that
survives a killed run and is removed after a successful one: by default
`<user cache>/convnets/train-resume/<fingerprint>/` (the user cache is
$XDG_CACHE_HOME, else ~/.cache), outside the project as DVC and Keras keep
their caches, so `data/` holds only DVC outputs and no clone shares it by
accident.

With $CONVNETS_RESUME_URL set (a local folder, `s3://...`, any fsspec URL; the
Prefect worker flows set it beside the DVC remote), every committed epoch is
also mirrored to `<url>/<fingerprint>/`, so a run killed on one machine
resumes on another from its last finished epoch (ResumeMirror).

After every epoch the callback writes one folder `epoch-NNNN` (NNNN = epochs
finished) holding:

- state.weights.h5: the weights of the model being trained and its
  optimizer's state (Keras's save_weights stores both; with train.ema the
  optimizer's moving averages too, and the averaged weights sit in the model's
  place, see convnets.averaging.AveragedWeights);
- best.weights.h5: the weights of the epoch with the lowest val_loss so far
  (what the book's ModelCheckpoint(save_best_only=True) keeps);
- history.json: every finished epoch's metrics and the best epoch.

The folder is written under a temporary name and renamed when complete, so a
kill at any instant leaves either the previous epoch's folder or the new one,
never a half-written state; and weights, best model and history always belong
to the same epoch. (keras.callbacks.BackupAndRestore overwrites its weights file
in place and writes the epoch number afterwards, and knows nothing of the best
model or the metrics log, hence this callback.)

A fingerprint of params and data is kept with the state: a rerun with other
params or other data starts over instead of resuming someone else's training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras

from convnets.layout import RESUME_URL_ENV, user_cache_dir
from convnets.outputs import write_json

log = logging.getLogger(__name__)

LATEST = "LATEST"  # on the mirror: the name of the last complete epoch folder, written last

STATE = "state.weights.h5"
BEST = "best.weights.h5"
HISTORY = "history.json"
FINGERPRINT = "fingerprint.txt"
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


@dataclass
class Progress:
    """What the finished epochs left: their records and the folder holding their state."""

    history: list[dict] = field(default_factory=list)  # {"epoch", "phase", "seconds", "logs"}
    best_epoch: int | None = None
    folder: Path | None = None

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def best_record(self) -> dict:
        return self.history[self.best_epoch]


def default_resume_root(fingerprint: str) -> Path:
    return user_cache_dir() / "train-resume" / fingerprint


class ResumeMirror:
    """A copy of the last committed epoch in storage every worker reaches (fsspec URL)."""

    def __init__(self, url: str):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.base = url_to_fs(self.url)

    @classmethod
    def from_environment(cls) -> ResumeMirror | None:
        url = os.environ.get(RESUME_URL_ENV)
        return cls(url) if url else None

    def _path(self, fingerprint: str, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), fingerprint, *parts])

    def upload(self, fingerprint: str, folder: Path) -> None:
        """Copy one committed epoch folder, then point LATEST at it, then drop the older ones."""
        target = self._path(fingerprint, folder.name)
        self.fs.makedirs(target, exist_ok=True)
        for file in sorted(folder.iterdir()):
            self.fs.put_file(str(file), f"{target}/{file.name}")
        self.fs.pipe_file(self._path(fingerprint, LATEST), folder.name.encode())
        for old in self.fs.ls(self._path(fingerprint), detail=False):
            name = old.rstrip("/").rsplit("/", 1)[-1]
            if _EPOCH_DIR.match(name) and name != folder.name:
                self.fs.rm(old, recursive=True)

    def download(self, fingerprint: str, root: Path) -> bool:
        """Fetch the mirrored epoch folder into `root`; False when the mirror has none."""
        latest = self._path(fingerprint, LATEST)
        if not self.fs.exists(latest):
            return False
        name = self.fs.cat_file(latest).decode().strip()
        if not _EPOCH_DIR.match(name):
            return False
        tmp = root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for remote in self.fs.ls(self._path(fingerprint, name), detail=False):
            self.fs.get_file(remote, str(tmp / remote.rstrip("/").rsplit("/", 1)[-1]))
        os.replace(tmp, root / name)
        return True

    def remove(self, fingerprint: str) -> None:
        if self.fs.exists(self._path(fingerprint)):
            self.fs.rm(self._path(fingerprint), recursive=True)


class ResumeDir:
    """The backup folder of one training run (params + data), reused after an interruption."""

    def __init__(self, root: str | Path | None, fingerprint: str, mirror: ResumeMirror | None = None):
        self.root = Path(root) if root is not None else default_resume_root(fingerprint)
        self.fingerprint = fingerprint
        self.mirror = mirror

    @property
    def live_dir(self) -> Path:
        return self.root / "live"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def open(self) -> Progress:
        """The progress of an interrupted run with this fingerprint, or a fresh start."""
        stamp = self.root / FINGERPRINT
        if stamp.is_file() and stamp.read_text().strip() == self.fingerprint:
            progress = self._latest()
            if progress.epochs_done:
                log.info("resuming from %s: %d epoch(s) already done", self.root, progress.epochs_done)
            return progress
        if self.root.exists():
            log.info("%s holds the state of a run with other params or data: starting over", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        # Should the folder be put inside a checkout, keep it out of git.
        (self.root / ".gitignore").write_text("# training state of an interrupted run, see convnets/resume.py\n*\n")
        write_text_atomic(stamp, self.fingerprint)
        if self.mirror is not None and self.mirror.download(self.fingerprint, self.root):
            progress = self._latest()
            print(f"resume: took the state of {progress.epochs_done} finished epoch(s) from {self.mirror.url}")
            return progress
        return Progress()

    def mirror_epoch(self, folder: Path) -> None:
        """Copy a committed epoch to the mirror; a failed copy costs a later resume, not this run."""
        if self.mirror is None:
            return
        try:
            self.mirror.upload(self.fingerprint, folder)
        except OSError as exc:
            log.warning("could not mirror %s to %s: %s", folder.name, self.mirror.url, exc)

    def _latest(self) -> Progress:
        folders = sorted(
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _EPOCH_DIR.match(p.name)) and p.is_dir()
        )
        if not folders:
            return Progress()
        folder = folders[-1][1]
        saved = json.loads((folder / HISTORY).read_text())
        return Progress(history=saved["history"], best_epoch=saved["best_epoch"], folder=folder)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.mirror is not None:
            self.mirror.remove(self.fingerprint)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


class EpochBackup(keras.callbacks.Callback):
    """After each epoch: commit weights, optimizer state, best weights and history as one folder."""

    def __init__(self, resume_dir: ResumeDir, progress: Progress, phase: str, monitor: str = "val_loss"):
        super().__init__()
        self.resume_dir = resume_dir
        self.progress = progress
        self.phase = phase
        self.monitor = monitor
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        progress = self.progress
        record = {
            "epoch": epoch,
            "phase": self.phase,
            "seconds": round(time.perf_counter() - self._started, 3),
            "logs": {name: float(value) for name, value in (logs or {}).items()},
        }
        value = record["logs"][self.monitor]
        improved = progress.best_epoch is None or value < progress.best_record()["logs"][self.monitor]
        root = self.resume_dir.root
        name = f"epoch-{epoch + 1:04d}"
        tmp = root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.model.save_weights(tmp / STATE)
        if improved:
            link_or_copy(tmp / STATE, tmp / BEST)
        else:
            link_or_copy(progress.folder / BEST, tmp / BEST)
        history = [*progress.history, record]
        best_epoch = epoch if improved else progress.best_epoch
        write_json(tmp / HISTORY, {"history": history, "best_epoch": best_epoch})
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit: one rename
        previous = progress.folder
        progress.history, progress.best_epoch, progress.folder = history, best_epoch, final
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
        self.resume_dir.mirror_epoch(final)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the best weights are often this epoch's: no second copy
    except OSError:
        shutil.copy2(src, dst)


def restore_training_state(model: keras.Model, folder: Path) -> None:
    """Weights and optimizer state of a compiled model, as of the end of the folder's epoch."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    model.load_weights(folder / STATE)


def fingerprint(params_json: str, data_files: list[Path]) -> str:
    """A digest of the params that shape training and of the training data itself."""
    digest = hashlib.blake2b(params_json.encode(), digest_size=16)
    for path in data_files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
