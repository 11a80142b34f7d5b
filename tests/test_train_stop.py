"""train.stop_at_epoch: a run stops early and keeps its state; a later run of the same params goes on
from there and ends exactly as one run straight through (the budget stays train.epochs)."""

from __future__ import annotations

import json

import pytest
from test_train_resume import PLAIN, RESIDUAL, assert_same_training, history, resume_root

from conftest import write_params
from convnets.errors import ParamsError
from convnets.params import Params, load_params
from convnets.train import train
from test_train_pipeline import make_prepared

pytestmark = pytest.mark.long  # trains in process for half a minute or more: started early

# The schedule spans the whole budget: a warm-up into a cosine decay, and the moving average.
SCHEDULED = {"lr_schedule": "cosine", "warmup_epochs": 1, "ema": 0.9}


def with_stop(params: Params, stop: int | None) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"stop_at_epoch": stop})})


@pytest.mark.parametrize("model", [{}, RESIDUAL], ids=["plain", "batchnorm"])
def test_rungs_that_stop_early_and_go_on_end_as_one_straight_run(tmp_path, capsys, user_cache, model):
    """With the moving average, a fit that stops must keep the trained weights beside the averages."""
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate({"model": {**PLAIN["model"], **model}, "train": {**PLAIN["train"], **SCHEDULED}})
    straight = train(params, prepared, tmp_path / "a" / "model", tmp_path / "a" / "train")

    for stop in (1, 2):
        rung = tmp_path / f"rung-{stop}"
        train(with_stop(params, stop), prepared, rung / "model", rung / "train")
        out = capsys.readouterr().out
        assert f"train: stopped after epoch {stop} of 4 (train.stop_at_epoch)" in out
        assert len(history(rung / "train")) == stop  # its outputs are those of its epochs
        stopped = json.loads((rung / "train" / "stopped.json").read_text())
        assert stopped == {"epochs_done": stop, "epochs": 4, "state": resume_root(user_cache).name}
        assert (resume_root(user_cache) / f"epoch-{stop:04d}").is_dir()  # the state waits for the next rung

    final = train(with_stop(params, None), prepared, tmp_path / "b" / "model", tmp_path / "b" / "train")
    assert "resuming train at epoch 3 of 4" in capsys.readouterr().out
    assert not (tmp_path / "b" / "train" / "stopped.json").exists()
    assert final == straight
    assert_same_training(tmp_path / "a", tmp_path / "b")
    assert not (user_cache / "convnets" / "train-resume").exists() or not any(
        (user_cache / "convnets" / "train-resume").iterdir()
    )  # the full run removed the state


def test_a_stopped_run_reports_its_best_epoch_so_far(tmp_path, user_cache):
    prepared = make_prepared(tmp_path / "prepared")
    params = Params.model_validate({**PLAIN, "train": {**PLAIN["train"], "stop_at_epoch": 2}})
    best = train(params, prepared, tmp_path / "model", tmp_path / "train")
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert best["epoch"] in (0, 1) and metrics["best"]["epoch"] == best["epoch"]
    assert (tmp_path / "model" / "model.keras").is_file()


def test_the_stop_is_checked_against_the_budget(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"train": {"epochs": 4, "stop_at_epoch": 5}})
    with pytest.raises(ParamsError, match=r"train.stop_at_epoch.*budget of 4 epochs \(got 5\)"):
        load_params(path)
    path = write_params(tmp_path / "params.yaml", {"train": {"epochs": 4, "stop_at_epoch": 0}})
    with pytest.raises(ParamsError, match="train.stop_at_epoch"):
        load_params(path)
    path = write_params(tmp_path / "params.yaml", {"train": {"epochs": 4, "stop_at_epoch": 4}})
    assert load_params(path).train.stop_at_epoch == 4
