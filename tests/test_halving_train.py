"""Successive halving with real training, no DVC or Prefect: 16 points of a tiny convnet on the embedded
MNIST sample, 8 epochs, halving factor 2, against the whole grid trained straight through.

Each rung is a train() call with train.stop_at_epoch; the points alternate between two
workers' user caches, and their states travel through a shared mirror (CONVNETS_RESUME_URL),
as they do between the fleet's workers.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from test_train_resume import history

import convnets.resume
from conftest import TINY_OVERRIDES, deep_update, default_params
from convnets.params import Params
from convnets.preprocess import preprocess
from convnets.split import read_catalog, split
from convnets.train import train
from pipeline.halving import Standing, planned_epochs, promote, rank, rung_epochs

pytestmark = pytest.mark.long  # trains in process for half a minute or more: started early

EPOCHS, ETA = 8, 2
GRID = [
    {"train": {"learning_rate": rate, "optimizer": optimizer}, "model": {"dropout": dropout}}
    for rate, optimizer, dropout in itertools.product((0.01, 0.001, 0.0001, 0.00001), ("adam", "sgd"), (0.0, 0.5))
]
TINY_MODEL = {"conv_filters": [8, 16], "pooled_blocks": 2}


def point_name(point: dict) -> str:
    return f"{point['train']['optimizer']}-lr{point['train']['learning_rate']}-dropout{point['model']['dropout']}"


def point_params(point: dict, stop: int | None = None) -> Params:
    tiny = deep_update(default_params(), TINY_OVERRIDES)
    changes = {"model": {**TINY_MODEL, **point["model"]}, "train": {**point["train"], "epochs": EPOCHS}}
    params = deep_update(tiny, changes)
    params["train"].update(stop_at_epoch=stop, cpu_bfloat16=False)
    return Params.model_validate(params)


@pytest.fixture(scope="module")
def prepared(mnist_raw, tmp_path_factory):
    params = point_params(GRID[0])
    out = tmp_path_factory.mktemp("halving") / "prepared"
    preprocess(split(read_catalog(mnist_raw), params.split, params.seed), mnist_raw, params.preprocess, out)
    return out


@pytest.fixture
def epochs_counted(monkeypatch):
    """How many epochs training really ran (each committed epoch passes through the backup once)."""
    count = {"epochs": 0}
    original = convnets.resume.EpochBackup.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        count["epochs"] += 1
        original(self, epoch, logs)

    monkeypatch.setattr(convnets.resume.EpochBackup, "on_epoch_end", on_epoch_end)
    return count


def test_halving_trains_a_third_of_the_grid_and_finds_its_best_point(
    prepared, tmp_path, monkeypatch, capsys, epochs_counted
):
    names = [point_name(point) for point in GRID]
    grid = {}
    for name, point in zip(names, GRID, strict=True):
        grid[name] = train(
            point_params(point), prepared, tmp_path / "grid" / name / "model", tmp_path / "grid" / name / "train"
        )
    grid_epochs = epochs_counted["epochs"]
    assert grid_epochs == len(GRID) * EPOCHS
    ranked = rank([Standing(name, best["val_loss"]) for name, best in grid.items()])
    best, runner_up = ranked[0], ranked[1]
    assert runner_up.figure > best.figure * 1.02, f"the grid's best must lead clearly: {ranked[:3]}"

    # Successive halving: two workers' caches, one mirror.
    monkeypatch.setenv("CONVNETS_RESUME_URL", str(tmp_path / "mirror"))
    workers = [tmp_path / "worker-a", tmp_path / "worker-b"]
    by_name = dict(zip(names, GRID, strict=True))
    alive, reached, last = list(names), {}, None
    for index, epochs in enumerate(rung_epochs(EPOCHS, ETA)):
        stop = None if epochs == EPOCHS else epochs
        standings = []
        for number, name in enumerate(alive):
            # The other worker than last rung's for every point: each promoted point moves.
            monkeypatch.setenv("XDG_CACHE_HOME", str(workers[(number + index) % 2]))
            out = tmp_path / "halving" / f"{name}-rung{index}"
            figures = train(point_params(by_name[name], stop), prepared, out / "model", out / "train")
            standings.append(Standing(name, figures["val_loss"]))
            reached[name] = epochs
            last = out
        if epochs == EPOCHS:
            finalists = alive
            break
        alive = promote(standings, ETA)
    out = capsys.readouterr().out
    halving_epochs = epochs_counted["epochs"] - grid_epochs

    assert halving_epochs == planned_epochs(len(GRID), EPOCHS, ETA) == 40
    assert halving_epochs <= 0.4 * grid_epochs
    assert sum(reached.values()) == halving_epochs  # a promoted point trains each epoch once
    assert "resume: took the state of" in out  # promoted points went on from the mirror on the other worker
    winner = rank([Standing(name, grid[name]["val_loss"]) for name in finalists])[0].name
    assert winner == best.name
    for name in finalists:
        rung = tmp_path / "halving" / f"{name}-rung{len(rung_epochs(EPOCHS, ETA)) - 1}"
        for split_name in ("train", "eval"):
            pd.testing.assert_frame_equal(
                history(tmp_path / "grid" / name / "train", split_name), history(rung / "train", split_name)
            )
    assert last is not None
