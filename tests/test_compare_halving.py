"""compare.html and the `dvc-leaderboard` table show a halving sweep's rungs as one row per point:
the rung it reached, its rank among every run of that rung (as the sweep ranked them), test figures
only for the points that finished."""

from __future__ import annotations

from dataclasses import replace

from convnets.compare import Experiment, leaderboard
from convnets.figures import Figures


def run(name: str, rate: float, stop: int | None, val_loss: float, accuracy: float = 0.9) -> Experiment:
    params = {"seed": 42, "train.learning_rate": rate, "train.epochs": 4, "train.stop_at_epoch": stop}
    figures = Figures(test_accuracy=accuracy, roc_auc=0.95, best_epoch=1, epochs=stop or 4, val_loss=val_loss)
    return Experiment(name=name, rev=name, baseline="c" * 40, params=params, figures=figures)


def test_each_point_is_one_row_at_the_rung_it_reached_ranked_there():
    experiments = [
        run("lr-a-e1", 0.1, 1, 0.50),
        run("lr-b-e1", 0.01, 1, 0.30),
        run("lr-c-e1", 0.001, 1, 0.20),
        run("lr-d-e1", 0.0001, 1, 0.60),
        run("lr-b-e2", 0.01, 2, 0.25),
        run("lr-c-e2", 0.001, 2, 0.15),
        run("lr-c", 0.001, None, 0.10, accuracy=0.93),
    ]
    columns, rows = leaderboard(experiments)
    assert columns[:7] == ["experiment", "test accuracy", "ROC AUC", "best epoch", "training time", "rung", "rank"]
    assert [(row["experiment"], row["rung"], row["rank"]) for row in rows] == [
        ("lr-c", "finished", "1 of 1"),
        ("lr-b-e2", "stopped at 2 of 4", "2 of 2"),  # ranked among every run of rung 2, as the sweep ranked it
        ("lr-a-e1", "stopped at 1 of 4", "3 of 4"),
        ("lr-d-e1", "stopped at 1 of 4", "4 of 4"),
    ]
    assert rows[0]["test accuracy"] == "0.9300"
    assert all(row["test accuracy"] == "" for row in rows[1:])  # a stopped rung's test figures decided nothing


def test_experiments_without_rungs_keep_their_rows():
    plain = [run("a", 0.1, None, 0.3, accuracy=0.8), run("b", 0.01, None, 0.2, accuracy=0.9)]
    columns, rows = leaderboard(plain)
    assert "rung" not in columns and [row["experiment"] for row in rows] == ["b", "a"]


def test_the_rungs_rank_by_the_sweeps_metric_higher_accuracy_first():
    experiments = [run("lr-a-e1", 0.1, 1, 0.5), run("lr-b-e1", 0.01, 1, 0.3), run("lr-a", 0.1, None, 0.4)]
    for exp, accuracy in zip(experiments[:2], (0.9, 0.6), strict=True):
        exp.figures = replace(exp.figures, val_accuracy=accuracy)
    ranks = {row["experiment"]: row["rank"] for row in leaderboard(experiments, metric="val_accuracy")[1]}
    assert ranks == {"lr-a": "1 of 1", "lr-b-e1": "2 of 2"}  # by val_loss lr-b-e1 would be 1 of 2
    by_loss = {row["experiment"]: row["rank"] for row in leaderboard(experiments)[1]}
    assert by_loss["lr-b-e1"] == "1 of 2"
