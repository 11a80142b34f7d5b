"""One reader of a run's figures (convnets.figures): epochs count from 1 everywhere, read once.

DVCLive counts steps from 0, the book and the pages from 1: the report, compare and a
sweep's table read the same run as the same figures. No TensorFlow: files written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from convnets import compare
from convnets.figures import Figures, epoch_of_step, figures_of, read_figures, read_history, read_run
from convnets.report import headline_cards

TRAIN = {
    "step": 9,
    "best": {"epoch": 4, "val_loss": 0.25, "val_accuracy": 0.91},
    "devices": {"gpu_count": 1, "mixed_precision": 1},
}
EVAL = {"test": {"accuracy": 0.9, "roc_auc": 0.95, "loss": 0.3, "macro_f1": 0.89, "per_class": {"cat": {}}}}
TIMINGS = {"seconds": 95.0, "seconds_per_epoch": 9.5, "finished": "2026-01-02 03:04 UTC"}


def write_run(root: Path) -> Path:
    """A finished run's metrics files where a checkout has them."""
    for path, data in (
        ("data/train/metrics.json", TRAIN),
        ("data/eval/metrics.json", EVAL),
        ("timings/train.json", TIMINGS),
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(data))
    return root


def test_a_step_is_the_epoch_before_it():
    assert [epoch_of_step(step) for step in (0, 4, 9.0)] == [1, 5, 10]
    assert [epoch_of_step(bad) for bad in (None, True, 1.5, math.nan, "3")] == [None] * 5


def test_the_best_epoch_and_the_epochs_count_from_1():
    figures = figures_of(TRAIN, EVAL, TIMINGS)
    assert (figures.best_epoch, figures.epochs) == (5, 10)
    assert (figures.test_accuracy, figures.roc_auc, figures.test_loss, figures.macro_f1) == (0.9, 0.95, 0.3, 0.89)
    assert (figures.training_seconds, figures.training_exact, figures.finished) == (95.0, True, TIMINGS["finished"])
    assert (figures.gpu_count, figures.mixed_precision) == (1, True)
    assert figures.headline() == {
        "test_accuracy": 0.9,
        "roc_auc": 0.95,
        "best_epoch": 5,
        "epochs": 10,
        "val_loss": 0.25,  # the best epoch's: what a halving sweep ranks by
        "val_accuracy": 0.91,
    }


def test_what_a_run_did_not_record_is_blank():
    assert figures_of(None, None) == Figures() == read_run(Path("no-such-checkout"))
    older = figures_of({"step": 2, "seconds_per_epoch": 4.0}, {"test": {"accuracy": math.nan}})
    assert older.test_accuracy is None and (older.training_seconds, older.training_exact) == (12.0, False)


def test_report_compare_and_a_checkout_read_the_same_figures(tmp_path):
    root = write_run(tmp_path)
    from_checkout = read_run(root)
    from_stage_folders = read_figures(root / "data/train", root / "data/eval", TIMINGS)
    files = {"data/train/metrics.json": TRAIN, "data/eval/metrics.json": EVAL, "timings/train.json": TIMINGS}
    show = [
        {
            "rev": "c" * 40,
            "name": "main",
            "experiments": [
                {
                    "name": "e",
                    "revs": [
                        {
                            "rev": "1" * 40,
                            "error": None,
                            "data": {"metrics": {f: {"data": d} for f, d in files.items()}, "params": {}},
                        }
                    ],
                }
            ],
        }
    ]
    from_dvc = compare.experiments_from_show(show)[0].figures
    assert from_checkout == from_stage_folders == from_dvc
    # ... and each page shows the best epoch as the same "5 of 10"
    assert compare.leaderboard([compare.experiments_from_show(show)[0]])[1][0]["best epoch"] == "5 of 10"
    assert headline_cards(from_stage_folders, True, 10)[-1][2] == "5 of 10"


@pytest.mark.parametrize("timestamp", [False, True], ids=["plain", "with-timestamps"])
def test_the_history_counts_epochs_from_1(tmp_path, timestamp):
    for split in ("train", "eval"):
        folder = tmp_path / "plots" / "metrics" / split
        folder.mkdir(parents=True)
        for metric in ("accuracy", "loss"):
            # DVCLive writes a timestamp column first when asked to
            head, stamp = ("timestamp\tstep", "17000\t") if timestamp else ("step", "")
            rows = [f"{stamp}{step}\t0.{step + 1}" for step in range(3)]
            (folder / f"{metric}.tsv").write_text("\n".join([f"{head}\t{metric}", *rows]) + "\n")
    history = read_history(tmp_path)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert sorted(history.columns) == ["accuracy", "epoch", "loss", "val_accuracy", "val_loss"]
    assert history["val_loss"].tolist() == [0.1, 0.2, 0.3]
