"""A killed or interrupted training run resumes from its last finished epoch when rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import convnets.resume
from conftest import write_params
from convnets.params import Params
from convnets.train import train
from test_train_pipeline import make_prepared

pytestmark = pytest.mark.long  # trains in process for half a minute or more: started early

# A resumed run must end with exactly the uninterrupted run's weights; random layers (RANDOM_LAYERS)
# too, since their generators' states are saved with each epoch.
PLAIN = {"model": {"conv_filters": [8, 16], "pooled_blocks": 2}, "train": {"epochs": 4, "batch_size": 16}}


class Interrupt(Exception):
    pass


@pytest.fixture
def interrupt_after(monkeypatch):
    return interrupter(monkeypatch)


def interrupter(monkeypatch):
    """A function that makes the next training run stop right after epoch `n` (1-based) has been committed."""

    def arm(n: int):
        original = convnets.resume.EpochBackup.on_epoch_end
        state = {"armed": True}

        def on_epoch_end(self, epoch, logs=None):
            original(self, epoch, logs)
            if state["armed"] and epoch + 1 == n:
                state["armed"] = False
                raise Interrupt

        monkeypatch.setattr(convnets.resume.EpochBackup, "on_epoch_end", on_epoch_end)

    return arm


def resume_root(cache):
    """The one run's state folder in the test's user cache (named by the run's params and data)."""
    (root,) = (cache / "convnets" / "train-resume").iterdir()
    return root


def history(live_dir, split="eval", metric="loss") -> pd.DataFrame:
    return pd.read_csv(live_dir / "plots" / "metrics" / split / f"{metric}.tsv", sep="\t")


# The record preset's training ingredients without random layers: AdamW, a warm-up into the
# cosine decay (the step counter must resume), label smoothing, MixUp (its blends are keyed
# by seed, epoch and batch) and the moving average of the weights (its averages must resume).
RECORD_TRAINING = {
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "lr_schedule": "cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "mixup": 0.2,
    "ema": 0.9,
}


def saved_weights(model_dir) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(model_dir / "model.keras").get_weights()


def assert_same_training(a, b) -> None:
    """Two runs' outputs (model/ and train/ under a and b): the same per-epoch history, the same weights."""
    for split in ("train", "eval"):
        pd.testing.assert_frame_equal(history(a / "train", split), history(b / "train", split))
    for left, right in zip(saved_weights(a / "model"), saved_weights(b / "model"), strict=True):
        np.testing.assert_array_equal(left, right)


# Residual blocks (BatchNorm after each convolution, no random layers): with train.ema the
# averaged weights get BatchNorm statistics of their own before each validation.
RESIDUAL = {"block": "residual", "stem_filters": 8, "conv_filters": [8, 16], "pooled_blocks": 2}
# The book's random layers: Dropout before the classifier, augmentation at the front.
RANDOM_LAYERS = {"dropout": 0.5, "augmentation": {"flip": "horizontal", "rotation": 0.1, "zoom": 0.2}}


@pytest.mark.parametrize(
    ("model", "training"),
    [
        ({}, {"lr_schedule": "constant"}),
        ({}, {"lr_schedule": "cosine"}),
        ({}, {"ema": 0.9}),
        ({}, RECORD_TRAINING),
        (RESIDUAL, {**RECORD_TRAINING, "ema": 0.99}),
        (RANDOM_LAYERS, {"lr_schedule": "constant"}),
    ],
    ids=["constant", "cosine", "ema", "record", "record-batchnorm", "random-layers"],
)
def test_interrupted_run_ends_exactly_like_an_uninterrupted_one(
    tmp_path, interrupt_after, capsys, model, training, user_cache
):
    """Weights, optimizer state (with the schedule's step count and the EMA) and data order all resume."""
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate({"model": {**PLAIN["model"], **model}, "train": {**PLAIN["train"], **training}})
    straight = train(params, prepared, tmp_path / "a" / "model", tmp_path / "a" / "train")

    interrupt_after(2)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "b" / "model", tmp_path / "b" / "train")
    resume_dir = resume_root(user_cache)
    assert sorted(p.name for p in resume_dir.iterdir()) == [".gitignore", "epoch-0002", "key.json", "live"]
    assert sorted(p.name for p in (resume_dir / "epoch-0002").iterdir()) == [
        "best.weights.h5",
        "history.json",
        "key.json",
        "random.npz",
        "state.weights.h5",
    ]
    assert not (tmp_path / "b" / "model").exists()  # no half output
    capsys.readouterr()

    resumed = train(params, prepared, tmp_path / "b" / "model", tmp_path / "b" / "train")
    assert "resuming train at epoch 3 of 4" in capsys.readouterr().out
    assert resumed == straight
    assert_same_training(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "train" / "metrics.json").read_text())["step"] == 3
    assert not resume_dir.exists()  # removed after success
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model", "train"]


def test_other_params_start_over(tmp_path, interrupt_after, capsys):
    prepared = make_prepared(tmp_path / "prepared")
    interrupt_after(1)
    with pytest.raises(Interrupt):
        train(Params.model_validate(PLAIN), prepared, tmp_path / "model", tmp_path / "train")
    capsys.readouterr()
    changed = Params.model_validate({**PLAIN, "train": {**PLAIN["train"], "epochs": 2, "learning_rate": 0.01}})
    train(changed, prepared, tmp_path / "model", tmp_path / "train")
    out = capsys.readouterr().out
    assert "resuming" not in out and "Epoch 1/2" in out
    assert list(history(tmp_path / "train")["step"]) == [0, 1]


def test_fine_tuning_resumes_without_recomputing_the_base_outputs(tmp_path, interrupt_after, capsys, user_cache):
    """Two phases (cached VGG16 features, then the last 4 layers unfrozen), interrupted in the first."""
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate(
        {
            "model": {
                "base": "vgg16",
                "weights": "none",
                "cached_features": True,
                "trainable_layers": 4,
                "dense_units": [8],
                "dropout": 0.5,
            },
            "preprocess": {"channels": 3, "image_size": [32, 32]},
            "train": {"epochs": 2, "fine_tune_epochs": 2, "batch_size": 16},
        }
    )
    interrupt_after(1)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    assert "computing the frozen base's outputs for 64 train images" in capsys.readouterr().out
    assert (resume_root(user_cache) / "features" / "train.npy").is_file()

    best = train(params, prepared, tmp_path / "model", tmp_path / "train")
    out = capsys.readouterr().out
    assert "computing the frozen base's outputs" not in out
    assert "resuming train at epoch 2 of 2" in out and "Epoch 4/4" in out
    assert list(history(tmp_path / "train")["step"]) == [0, 1, 2, 3]
    assert best["val_loss"] == pytest.approx(history(tmp_path / "train")["loss"].min(), rel=1e-6)


def test_killed_process_resumes_from_its_last_finished_epoch(tmp_path, user_cache):
    """SIGKILL in the middle of epoch 2, as a crash or an evicted worker would; rerun the stage."""
    prepared = make_prepared(tmp_path / "prepared", sizes=(640, 64, 16), size=64)
    params_file = write_params(
        tmp_path / "params.yaml",
        {
            "model": {"conv_filters": [16, 32], "pooled_blocks": 2},
            "train": {"epochs": 4, "batch_size": 16},
        },
    )
    command = [
        sys.executable,
        "-m",
        "convnets.train",
        str(prepared),
        str(tmp_path / "model"),
        str(tmp_path / "train"),
        "--params",
        str(params_file),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while not list(user_cache.glob("convnets/train-resume/*/epoch-0001")):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "no epoch finished within 5 minutes"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    resume_dir = resume_root(user_cache)
    committed = sorted(p.name for p in resume_dir.glob("epoch-*"))
    assert committed == ["epoch-0001"], committed  # killed during epoch 2
    assert not (tmp_path / "model").exists() and not (tmp_path / "train").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming train at epoch 2 of 4" in second.stdout
    assert "Epoch 1/4" not in second.stdout
    for split in ("train", "eval"):
        assert list(history(tmp_path / "train", split)["step"]) == [0, 1, 2, 3]
    summary = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert summary["step"] == 3 and 0 <= summary["best"]["epoch"] <= 3
    assert (tmp_path / "model" / "model.keras").is_file() and not resume_dir.exists()


def run_key(**changes) -> convnets.resume.RunKey:
    digests = {"params": "p", "data": "d", "code": "c", "environment": "e", "precision": "f"}
    return convnets.resume.RunKey(**{**digests, **changes})


def test_resume_folder_keeps_itself_out_of_git(tmp_path, capsys):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    state = convnets.resume.ResumeDir(tmp_path / "data" / "train-resume", run_key())
    state.open()
    (state.root / "epoch-0001").mkdir()
    (state.root / "epoch-0001" / "state.weights.h5").write_bytes(b"x")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
    # Other params in the same folder: the old state is dropped, and the line says why.
    assert convnets.resume.ResumeDir(state.root, run_key(params="other")).open().epochs_done == 0
    assert not (state.root / "epoch-0001").exists()
    assert json.loads((state.root / "key.json").read_text())["params"] == "other"
    assert "(made with other params): starting over" in capsys.readouterr().out


def test_run_resumes_on_another_machine_from_the_mirror(tmp_path, interrupt_after, capsys, monkeypatch):
    """The epoch state mirrored to shared storage: a fresh cache (another worker) resumes from it."""
    mirror = tmp_path / "mirror"
    monkeypatch.setenv(convnets.resume.RESUME_URL_ENV, f"file://{mirror}")
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate(PLAIN)
    interrupt_after(2)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    (folder_name,) = [p.name for p in mirror.iterdir()]
    assert sorted(p.name for p in (mirror / folder_name).iterdir()) == ["LATEST", "epoch-0002"]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-machine-cache"))  # nothing local
    capsys.readouterr()
    train(params, prepared, tmp_path / "model", tmp_path / "train")
    out = capsys.readouterr().out
    assert "took the state of 2 finished epoch(s)" in out and "resuming train at epoch 3 of 4" in out
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["step"] == 3
    assert not (mirror / folder_name).exists()  # deleted once training succeeded
