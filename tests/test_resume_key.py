"""A training state resumes only the run that made it: same params, data, code, environment and precision.

Each test interrupts a tiny training run after an epoch, changes one thing (or
breaks the saved state), and reruns: the rerun must start over with one line
naming what differed, or resume when nothing did. The interruption and the tiny
model come from test_train_resume.py, the tiny data from test_train_pipeline.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import keras
import pytest
from test_train_resume import PLAIN, Interrupt, history, interrupter, resume_root

import convnets.devices
import convnets.train
from conftest import REPO_ROOT
from convnets.params import Params
from convnets.resume import RESUME_URL_ENV
from convnets.train import train
from test_train_pipeline import make_prepared

pytestmark = pytest.mark.long  # trains in process for half a minute or more: started early

COMPONENTS = ("params", "data", "code", "environment", "precision")


@pytest.fixture
def interrupt_after(monkeypatch):
    return interrupter(monkeypatch)


def discard_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("resume: discarded")]


def named_components(line: str) -> set[str]:
    return {name for name in COMPONENTS if name in line}


def interrupted_then_rerun(tmp_path, interrupt_after, capsys, change, params=None, after: int = 1) -> str:
    """Train until epoch `after` is committed, apply `change`, train again; the rerun's output."""
    prepared = make_prepared(tmp_path / "prepared")
    params = params or Params.model_validate(PLAIN)
    interrupt_after(after)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    change()
    capsys.readouterr()
    train(params, prepared, tmp_path / "model", tmp_path / "train")
    out = capsys.readouterr().out
    assert list(history(tmp_path / "train")["step"]) == [0, 1, 2, 3]  # the run completes either way
    return out


def assert_started_over_naming(out: str, component: str) -> None:
    (line,) = discard_lines(out)
    assert named_components(line) == {component}, line
    assert "starting over" in line
    assert "resuming" not in out and "Epoch 1/4" in out


@pytest.fixture(autouse=True)
def copied_src(tmp_path, monkeypatch):
    """A copy of src/ that the train stage takes for its own code: a test edits it as a checkout
    is edited by hand, and nothing else does (an edit of this checkout while the test runs would)."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # raising=False: on code without source_dir the test still runs, and fails on its assertions.
    monkeypatch.setattr(convnets.train, "source_dir", lambda: src, raising=False)
    return src


def test_code_change_starts_over(tmp_path, interrupt_after, capsys, copied_src):
    """The issue's case: killed after epoch 1, a line of datasets.py changed, rerun."""

    def edit_datasets():
        with (copied_src / "convnets" / "datasets.py").open("a") as handle:
            handle.write("# a fix\n")

    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, edit_datasets)
    assert_started_over_naming(out, "code")


def test_unchanged_code_resumes(tmp_path, interrupt_after, capsys, copied_src):
    """The control: the same interruption and rerun without a change resume."""
    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, lambda: None)
    assert discard_lines(out) == []
    assert "resuming train at epoch 2 of 4" in out and "Epoch 1/4" not in out


def test_code_digest_reads_the_running_code(monkeypatch):
    """The digest's files are the ones Python runs, not some other checkout's."""
    monkeypatch.undo()  # the real source_dir, not the copy of the autouse fixture (this test writes nothing)
    assert convnets.train.source_dir() / "convnets" / "train.py" == Path(convnets.train.__file__).resolve()
    assert convnets.train.code_digest() == convnets.train.code_digest(convnets.train.source_dir())


def test_environment_change_starts_over(tmp_path, interrupt_after, capsys, monkeypatch):
    def upgrade_tensorflow():
        identity = {**convnets.train.environment_identity(), "tensorflow": "99.0.0"}
        monkeypatch.setattr(convnets.train, "environment_identity", lambda: identity)

    monkeypatch.setattr(convnets.train, "environment_identity", lambda: {"python": "3.12"}, raising=False)
    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, upgrade_tensorflow)
    assert_started_over_naming(out, "environment")


def test_environment_identity_names_python_and_the_training_packages():
    identity = convnets.train.environment_identity()
    assert identity["python"].count(".") == 1  # major.minor: a patch release keeps the state
    assert identity["tensorflow"] and identity["keras"] == keras.__version__ and identity["numpy"]


def test_state_of_another_precision_starts_over(tmp_path, interrupt_after, capsys, monkeypatch):
    """cpu_bfloat16: auto ran mixed_bfloat16 on one machine, float32 on the next: same params."""
    monkeypatch.setattr(convnets.devices, "cpu_has_bfloat16", lambda *_: True)
    params = Params.model_validate({**PLAIN, "train": {**PLAIN["train"], "cpu_bfloat16": "auto"}})

    def move_to_a_cpu_without_bfloat16():
        monkeypatch.setattr(convnets.devices, "cpu_has_bfloat16", lambda *_: False)

    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, move_to_a_cpu_without_bfloat16, params)
    assert "precision float32" in out
    assert_started_over_naming(out, "precision")


def test_state_whose_optimizer_does_not_restore_is_discarded(tmp_path, interrupt_after, capsys, monkeypatch):
    """Keras only warns when the optimizer's variables do not match, and leaves its step counter at 0."""
    real = convnets.train.make_optimizer
    first_run = {"sgd": True}

    def plain_sgd_in_the_first_run(*args, **kwargs):
        # Plain SGD has no slots: its saved state cannot fill RMSprop's.
        return keras.optimizers.SGD(0.01) if first_run["sgd"] else real(*args, **kwargs)

    monkeypatch.setattr(convnets.train, "make_optimizer", plain_sgd_in_the_first_run)
    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, lambda: first_run.update(sgd=False))
    (line,) = discard_lines(out)
    assert "step" in line and "starting over" in line
    assert "resuming" not in out and "Epoch 1/4" in out


def corrupt(path) -> None:
    path.write_bytes(b"not what was saved")


@pytest.mark.parametrize("broken", ["state.weights.h5", "history.json"])
def test_unreadable_state_is_discarded_locally_and_on_the_mirror(
    tmp_path, interrupt_after, capsys, monkeypatch, user_cache, broken
):
    """A state that cannot be read no longer fails every rerun: it is dropped in both places."""
    mirror = tmp_path / "mirror"
    monkeypatch.setenv(RESUME_URL_ENV, f"file://{mirror}")

    def break_both_copies():
        root = resume_root(user_cache)
        corrupt(root / "epoch-0002" / broken)
        corrupt(mirror / root.name / "epoch-0002" / broken)

    out = interrupted_then_rerun(tmp_path, interrupt_after, capsys, break_both_copies, after=2)
    (line,) = discard_lines(out)
    assert str(user_cache) in line and str(mirror) in line and "cannot be read" in line
    assert "resuming" not in out and "Epoch 1/4" in out
    assert list(mirror.iterdir()) == []  # the mirror holds nothing once training succeeded


def test_unreadable_mirrored_state_is_discarded_on_the_mirror(tmp_path, interrupt_after, capsys, monkeypatch):
    """Another worker finds a broken state on the mirror: it starts over and replaces it."""
    mirror = tmp_path / "mirror"
    monkeypatch.setenv(RESUME_URL_ENV, f"file://{mirror}")
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate(PLAIN)
    interrupt_after(2)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    (folder,) = mirror.iterdir()
    corrupt(folder / "epoch-0002" / "history.json")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-machine-cache"))
    capsys.readouterr()
    interrupt_after(1)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    (line,) = discard_lines(capsys.readouterr().out)
    assert str(mirror) in line and "cannot be read" in line and "starting over" in line
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "epoch-0001"]
    assert json.loads((folder / "epoch-0001" / "history.json").read_text())["history"][0]["epoch"] == 0


def test_newer_mirrored_epoch_wins_over_an_older_local_one(tmp_path, interrupt_after, capsys, monkeypatch, user_cache):
    """A worker that kept epoch 1 locally resumes from the mirror's epoch 2, not from its own."""
    mirror = tmp_path / "mirror"
    monkeypatch.setenv(RESUME_URL_ENV, f"file://{mirror}")
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate(PLAIN)
    interrupt_after(1)
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    root = resume_root(user_cache)
    older = tmp_path / "epoch-1-state"
    shutil.copytree(root, older)
    interrupt_after(2)  # another worker resumed it and finished epoch 2
    with pytest.raises(Interrupt):
        train(params, prepared, tmp_path / "model", tmp_path / "train")
    shutil.rmtree(root)
    shutil.copytree(older, root)  # this worker still holds epoch 1
    assert sorted(p.name for p in resume_root(user_cache).glob("epoch-*")) == ["epoch-0001"]

    capsys.readouterr()
    train(params, prepared, tmp_path / "model", tmp_path / "train")
    out = capsys.readouterr().out
    assert "took the state of 2 finished epoch(s)" in out and "resuming train at epoch 3 of 4" in out
    assert discard_lines(out) == []
    assert list(history(tmp_path / "train")["step"]) == [0, 1, 2, 3]
    assert not (mirror / root.name).exists()


def test_epoch_is_fsynced_before_its_rename(tmp_path, interrupt_after, monkeypatch, user_cache):
    """Its files and its folder reach the disk before the rename commits it, and the rename after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    prepared = make_prepared(tmp_path / "prepared")
    interrupt_after(1)
    with pytest.raises(Interrupt):
        train(Params.model_validate(PLAIN), prepared, tmp_path / "model", tmp_path / "train")

    root = resume_root(user_cache).resolve()  # /proc names the files by their real paths
    committed = root / "epoch-0001"
    tmp = root / ".epoch-0001.partial"
    (commit,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[1:] == (str(tmp), str(committed))]
    synced_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    assert {str(tmp / p.name) for p in committed.iterdir()} | {str(tmp)} <= synced_before
    assert ("fsync", str(root)) in events[commit + 1 :]
