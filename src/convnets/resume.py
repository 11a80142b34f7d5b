"""Resumable training: what a killed `train` stage needs to go on from its last finished epoch.

DVC deletes a stage's declared outputs before it reruns it, and train builds
its outputs in temporary folders, so the state lives in a separate folder that
survives a killed run and is removed after a successful one: by default
`<user cache>/convnets/train-resume/<name>/` (the user cache is
$XDG_CACHE_HOME, else ~/.cache), outside the project as DVC and Keras keep
their caches, so `data/` holds only DVC outputs and no clone shares it by
accident.

With $CONVNETS_RESUME_URL set (a local folder, `s3://...`, any fsspec URL; the
Prefect worker flows set it beside the DVC remote), every committed epoch is
also mirrored to `<url>/<name>/`, so a run killed on one machine resumes on
another from its last finished epoch (ResumeMirror). When both hold a usable
state, the later epoch wins.

After every epoch the callback writes one folder `epoch-NNNN` (NNNN = epochs
finished) holding:

- state.weights.h5: the weights of the model being trained and its
  optimizer's state (Keras's save_weights stores both; with train.ema the
  optimizer's moving averages too, and the averaged weights sit in the model's
  place, see convnets.averaging.AveragedWeights);
- best.weights.h5: the weights of the epoch with the lowest val_loss so far
  (what the book's ModelCheckpoint(save_best_only=True) keeps);
- history.json: every finished epoch's metrics, the best epoch, and the
  optimizer's step counter (to check that a restore was complete);
- key.json: the run's key (below), so the mirror's copy names its run too.

The folder is written under a temporary name, synced to disk (files, then the
folder) and renamed when complete, so a kill or a power cut at any instant
leaves either the previous epoch's folder or the new one, never a half-written
state; and weights, best model and history always belong to the same epoch.
(keras.callbacks.BackupAndRestore overwrites its weights file in place and
writes the epoch number afterwards, and knows nothing of the best model or the
metrics log, hence this callback.)

A state resumes only the run that made it. Its key (RunKey) has one digest per
component: the params that shape training, the training data, the code of the
train stage, the runtime environment, and the precision and devices that ran.
The folder is named after params and data alone, so a rerun after a change of
code, environment or precision finds the old state, and discards it with one
line naming what differed. A state that cannot be read, or that does not
restore completely (weights, optimizer variables, step counter), is discarded
the same way, here and on the mirror, and training starts over: a broken state
never fails every rerun, and is never half used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from convnets.layout import RESUME_URL_ENV, resume_states_dir
from convnets.outputs import file_digest, replace_dir, write_json

log = logging.getLogger(__name__)

LATEST = "LATEST"  # on the mirror: the name of the last complete epoch folder, written last

STATE = "state.weights.h5"
BEST = "best.weights.h5"
HISTORY = "history.json"
KEY = "key.json"
RANDOM = "random.npz"  # the random layers' generator states (Dropout, augmentation): save_weights leaves them out
EPOCH_FILES = (STATE, BEST, HISTORY, KEY)
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")
# What reading a broken or foreign state raises (a missing file, bad JSON, a wrong layout);
# other errors, a mirror out of reach among them, are not the state's fault and propagate.
UNREADABLE = (FileNotFoundError, ValueError, KeyError, TypeError)


class UnusableState(Exception):
    """A saved state that cannot be restored completely: discard it and start over."""


@dataclass(frozen=True)
class RunKey:
    """What a training state belongs to, one digest per component: it resumes only an equal key."""

    params: str  # seed, model and train params
    data: str  # the training data's bytes
    code: str  # the project files the train stage imports
    environment: str  # Python and the packages training imports
    precision: str  # the dtype policy and the devices that ran, not the `auto` of params

    @property
    def folder_name(self) -> str:
        """Params and data only: a change of code, environment or precision finds the old state to discard."""
        return digest_text(self.params + self.data)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def differences(self, saved: dict) -> list[str]:
        """The components whose digest differs from a saved key's."""
        return [name for name, digest in self.as_dict().items() if saved.get(name) != digest]


def digest_text(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def digest_json(value: object) -> str:
    return digest_text(json.dumps(value, sort_keys=True))


def digest_files(files: dict[str, Path]) -> str:
    """A digest of files' names and bytes, in the order of their names (the names, not the paths,
    so that two checkouts in different folders agree)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        file_digest(files[name], lambda: digest)  # fed on: one digest of every name and file
    return digest.hexdigest()


@dataclass
class Progress:
    """What the finished epochs left: their records and the folder holding their state."""

    history: list[dict] = field(default_factory=list)  # {"epoch", "phase", "seconds", "logs"}
    best_epoch: int | None = None
    folder: Path | None = None
    optimizer_steps: int = 0  # the step counter of the optimizer saved in the folder's state

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def best_record(self) -> dict:
        return self.history[self.best_epoch]


@dataclass
class Found:
    """What one place (this machine's folder or the mirror) holds for a run."""

    where: str
    epochs: int = 0  # finished epochs of a usable state
    problem: str = ""  # why the state there cannot be used; "" when it can or there is none
    name: str = ""  # its epoch folder, on the mirror


def default_resume_root(folder_name: str) -> Path:
    return resume_states_dir() / folder_name


def read_key(text: str | bytes) -> dict:
    saved = json.loads(text)
    if not isinstance(saved, dict):
        raise ValueError(f"{KEY} holds no key")
    return saved


def read_history(text: str | bytes, folder_name: str) -> dict:
    """A committed epoch's history.json, checked against the epoch its folder names."""
    try:
        saved = json.loads(text)
        epochs, best = len(saved["history"]), saved["best_epoch"]
        int(saved["optimizer_steps"])
        if epochs != epoch_number(folder_name) or not 0 <= best < epochs:
            raise ValueError(f"its epochs are not those of {folder_name}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{HISTORY}: {exc}") from exc
    return saved


def epoch_number(folder_name: str) -> int:
    return int(_EPOCH_DIR.match(folder_name).group(1))


def made_with_other(components: list[str]) -> str:
    return f"made with other {', '.join(components)}"


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

    def _path(self, folder_name: str, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), folder_name, *parts])

    def upload(self, folder_name: str, folder: Path) -> None:
        """Copy one committed epoch folder, then point LATEST at it, then drop the older epochs."""
        target = self._path(folder_name, folder.name)
        self.fs.makedirs(target, exist_ok=True)
        for file in sorted(folder.iterdir()):
            self.fs.put_file(str(file), f"{target}/{file.name}")
        self.fs.pipe_file(self._path(folder_name, LATEST), folder.name.encode())
        for old in self.fs.ls(self._path(folder_name), detail=False):
            name = old.rstrip("/").rsplit("/", 1)[-1]
            if _EPOCH_DIR.match(name) and epoch_number(name) < epoch_number(folder.name):  # a later one wins
                self.fs.rm(old, recursive=True)

    def latest(self, folder_name: str) -> str | None:
        """The name of the last complete epoch folder on the mirror, None when there is none."""
        path = self._path(folder_name, LATEST)
        if not self.fs.exists(path):
            return None
        name = self.fs.cat_file(path).decode(errors="replace").strip()
        return name if _EPOCH_DIR.match(name) else None

    def read(self, folder_name: str, epoch: str, file: str) -> bytes:
        return self.fs.cat_file(self._path(folder_name, epoch, file))

    def files(self, folder_name: str, epoch: str) -> set[str]:
        paths = self.fs.ls(self._path(folder_name, epoch), detail=False)
        return {path.rstrip("/").rsplit("/", 1)[-1] for path in paths}

    def download(self, folder_name: str, epoch: str, root: Path) -> Path:
        """Fetch a mirrored epoch folder into `root`, committed as EpochBackup commits one."""
        tmp = root / f".{epoch}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for remote in self.fs.ls(self._path(folder_name, epoch), detail=False):
            self.fs.get_file(remote, str(tmp / remote.rstrip("/").rsplit("/", 1)[-1]))
        return commit_folder(tmp, root / epoch)

    def holds(self, folder_name: str) -> bool:
        return self.fs.exists(self._path(folder_name))

    def remove(self, folder_name: str) -> None:
        if self.fs.exists(self._path(folder_name)):
            self.fs.rm(self._path(folder_name), recursive=True)


class ResumeDir:
    """The backup folder of one training run (its RunKey), reused after an interruption."""

    def __init__(self, root: str | Path | None, key: RunKey, mirror: ResumeMirror | None = None):
        self.key = key
        self.folder_name = key.folder_name
        self.root = Path(root) if root is not None else default_resume_root(self.folder_name)
        self.mirror = mirror

    @property
    def live_dir(self) -> Path:
        return self.root / "live"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def open(self) -> Progress:
        """The progress of an interrupted run with this key (the later of this machine's and the
        mirror's), or a fresh start; a state of another key, or unreadable, is discarded first."""
        local, mirrored = self._check_local(), self._check_mirror()
        broken = [found for found in (local, mirrored) if found.problem]
        if local.problem:
            shutil.rmtree(self.root)
        if mirrored.problem:
            self.mirror.remove(self.folder_name)
        if broken:
            print(discard_line(broken, resumes=bool(local.epochs or mirrored.epochs)))
        self._prepare_root()
        if mirrored.epochs > local.epochs:
            progress = self._take_from_mirror(mirrored.name)
            print(f"resume: took the state of {progress.epochs_done} finished epoch(s) from {self.mirror.url}")
            return progress
        progress = self._latest()
        if progress.epochs_done:
            log.info("resuming from %s: %d epoch(s) already done", self.root, progress.epochs_done)
        return progress

    def discard(self, reason: str) -> None:
        """Drop a state that did not restore completely, here and on the mirror: the run starts over."""
        places = [f"in {self.root}"]
        if self.mirror is not None and self.mirror.holds(self.folder_name):
            places.append(f"on {self.mirror.url}")
        print(f"resume: discarded the saved state {' and '.join(places)} ({reason}): starting over")
        self.remove()

    def _check_local(self) -> Found:
        found = Found(f"in {self.root}")
        if not self.root.exists():
            return found
        try:
            saved = read_key((self.root / KEY).read_text())
        except UNREADABLE as exc:
            found.problem = f"its {KEY} cannot be read: {exc}"
            return found
        if differences := self.key.differences(saved):
            found.problem = made_with_other(differences)
            return found
        try:
            found.epochs = self._latest().epochs_done
        except UNREADABLE as exc:
            found.problem = f"it cannot be read: {exc}"
        return found

    def _check_mirror(self) -> Found:
        if self.mirror is None:
            return Found("")
        found = Found(f"on {self.mirror.url}", name=self.mirror.latest(self.folder_name) or "")
        if not found.name:
            return found
        try:
            missing = sorted(set(EPOCH_FILES) - self.mirror.files(self.folder_name, found.name))
            if missing:
                raise FileNotFoundError(f"{found.name} lacks {', '.join(missing)}")
            differences = self.key.differences(read_key(self.mirror.read(self.folder_name, found.name, KEY)))
            if differences:
                found.problem = made_with_other(differences)
                return found
            history = read_history(self.mirror.read(self.folder_name, found.name, HISTORY), found.name)
            found.epochs = len(history["history"])
        except UNREADABLE as exc:
            found.problem = f"it cannot be read: {exc}"
        return found

    def _prepare_root(self) -> None:
        if (self.root / KEY).is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # Should the folder be put inside a checkout, keep it out of git.
        (self.root / ".gitignore").write_text("# training state of an interrupted run, see convnets/resume.py\n*\n")
        write_json(self.root / KEY, self.key.as_dict(), sync=True)

    def _take_from_mirror(self, epoch: str) -> Progress:
        taken = self.mirror.download(self.folder_name, epoch, self.root)
        for folder in self._epoch_folders():
            if folder != taken:
                shutil.rmtree(folder, ignore_errors=True)
        return self._latest()

    def mirror_epoch(self, folder: Path) -> None:
        """Copy a committed epoch to the mirror; a failed copy costs a later resume, not this run."""
        if self.mirror is None:
            return
        try:
            self.mirror.upload(self.folder_name, folder)
        except OSError as exc:
            log.warning("could not mirror %s to %s: %s", folder.name, self.mirror.url, exc)

    def _epoch_folders(self) -> list[Path]:
        """The committed epoch folders, oldest first."""
        folders = [path for path in self.root.iterdir() if _EPOCH_DIR.match(path.name) and path.is_dir()]
        return sorted(folders, key=lambda path: epoch_number(path.name))

    def _latest(self) -> Progress:
        folders = self._epoch_folders()
        if not folders:
            return Progress()
        folder = folders[-1]
        for name in (STATE, BEST):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder.name} lacks {name}")
        saved = read_history((folder / HISTORY).read_bytes(), folder.name)
        return Progress(saved["history"], saved["best_epoch"], folder, int(saved["optimizer_steps"]))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.mirror is not None:
            self.mirror.remove(self.folder_name)


def discard_line(broken: list[Found], resumes: bool) -> str:
    """One line for the states dropped because they belong to another run or cannot be read."""
    places = " and ".join(f"{found.where} ({found.problem})" for found in broken)
    return f"resume: discarded the saved state {places}" + ("" if resumes else ": starting over")


def commit_folder(tmp: Path, final: Path) -> Path:
    """Rename a complete folder into place, its files and entries on the disk before the rename
    and the rename on the disk after it: a power cut cannot leave a committed but empty epoch."""
    return replace_dir(tmp, final, sync=True)


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
        np.savez(tmp / RANDOM, *[np.asarray(state) for state in random_states(self.model)])
        if improved:
            link_or_copy(tmp / STATE, tmp / BEST)
        else:
            link_or_copy(progress.folder / BEST, tmp / BEST)
        history = [*progress.history, record]
        best_epoch = epoch if improved else progress.best_epoch
        steps = int(self.model.optimizer.iterations)
        write_json(tmp / HISTORY, {"history": history, "best_epoch": best_epoch, "optimizer_steps": steps})
        write_json(tmp / KEY, self.resume_dir.key.as_dict())
        final = commit_folder(tmp, root / name)  # the commit: one rename
        previous = progress.folder
        progress.history, progress.best_epoch, progress.folder = history, best_epoch, final
        progress.optimizer_steps = steps
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
        self.resume_dir.mirror_epoch(final)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the best weights are often this epoch's: no second copy
    except OSError:
        shutil.copy2(src, dst)


def restore_training_state(model: keras.Model, progress: Progress) -> None:
    """Weights and optimizer state of a compiled model as of the end of the progress's epoch: all or nothing.

    Raises UnusableState when the state cannot be read or does not fill the model
    completely. Keras only warns when the optimizer's variables do not match (another
    optimizer, another precision's loss scaling) and leaves them, step counter
    included, as they were: the counter, checked against the one saved, tells.
    """
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(progress.folder / STATE)
        except Exception as exc:  # h5py, Keras and NumPy each raise their own on a broken or foreign file
            raise UnusableState(f"{STATE} cannot be read: {first_line(exc)}") from exc
    restore_random_states(model, progress.folder / RANDOM)
    steps = progress.optimizer_steps if optimizer is None else int(optimizer.iterations)
    if steps != progress.optimizer_steps:
        why = f": {first_line(caught[0].message)}" if caught else ""
        raise UnusableState(
            f"the optimizer's step counter restored as {steps}, saved as {progress.optimizer_steps}{why}"
        )
    for warning in caught:  # a complete restore: pass Keras's remarks on
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def random_states(model: keras.Model) -> list:
    """The state variables of the model's seed generators (Keras lists them in `variables`, not in `weights`).

    Dropout and the augmentation layers draw from them: restored, a resumed run draws the
    same masks and transformations as an uninterrupted one.
    """
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def restore_random_states(model: keras.Model, path: Path) -> None:
    states = random_states(model)
    try:
        with np.load(path) as saved:
            values = [saved[f"arr_{index}"] for index in range(len(saved.files))]
    except Exception as exc:  # a missing, truncated or foreign file: NumPy and zipfile raise their own
        raise UnusableState(f"{RANDOM} cannot be read: {first_line(exc)}") from exc
    if len(values) != len(states) or any(v.shape != tuple(s.shape) for v, s in zip(values, states, strict=False)):
        raise UnusableState(f"{RANDOM} holds {len(values)} random generator state(s), the model has {len(states)}")
    for state, value in zip(states, values, strict=True):
        state.assign(value)


def first_line(message: object) -> str:
    return str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
