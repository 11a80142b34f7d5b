"""pipeline.halving: the successive-halving planner as pure functions (rungs, promotions, budget)."""

from __future__ import annotations

import math

import pytest

from pipeline.halving import (
    HalvingError,
    Standing,
    closing_line,
    planned_epochs,
    promote,
    rank,
    rung_epochs,
    survivors,
)


@pytest.mark.parametrize(
    ("full", "eta", "minimum", "expected"),
    [
        (8, 2, 1, [1, 2, 4, 8]),
        (8, 3, 1, [1, 3, 8]),  # the last rung is the full budget, not the next power
        (10, 2, 2, [2, 4, 8, 10]),
        (1, 2, 1, [1]),
        (9, 3, 1, [1, 3, 9]),
    ],
)
def test_rungs_grow_by_the_factor_and_end_at_the_full_budget(full, eta, minimum, expected):
    assert rung_epochs(full, eta, minimum) == expected


@pytest.mark.parametrize(
    ("eta", "minimum", "message"), [(1, 1, "--halving"), (2, 0, "--min-epochs"), (2, 9, "--min-epochs")]
)
def test_bad_factors_and_minimums_are_refused_by_name(eta, minimum, message):
    with pytest.raises(HalvingError, match=message):
        rung_epochs(8, eta, minimum)


def test_the_issues_arithmetic_16_points_8_epochs_factor_2():
    assert planned_epochs(16, 8, 2) == 16 + 8 + 8 + 8 == 40
    assert planned_epochs(16, 8, 2) / (16 * 8) == pytest.approx(0.3125)


def test_survivors_round_up():
    assert [survivors(n, 2) for n in (16, 8, 5, 3, 1)] == [8, 4, 3, 2, 1]
    assert survivors(10, 3) == 4


def test_lowest_loss_first_ties_by_name_failures_last():
    standings = [
        Standing("c", 0.5),
        Standing("a", None),
        Standing("b", 0.5),
        Standing("d", 0.2),
        Standing("e", math.nan),
    ]
    assert [s.name for s in rank(standings)] == ["d", "b", "c", "a", "e"]


def test_accuracy_ranks_highest_first():
    standings = [Standing("a", 0.7), Standing("b", 0.9), Standing("c", 0.8)]
    assert [s.name for s in rank(standings, "val_accuracy")] == ["b", "c", "a"]


def test_a_test_figure_cannot_rank():
    with pytest.raises(HalvingError, match="--halving-metric"):
        rank([Standing("a", 0.1)], "test_accuracy")


def test_promotion_keeps_the_best_half_and_never_a_failed_run():
    standings = [Standing(name, loss) for name, loss in zip("abcdefgh", [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])]
    assert promote(standings, 2) == ["b", "f", "d", "h"]
    failed = [Standing("a", 0.3), Standing("b", None), Standing("c", None)]
    assert promote(failed, 2) == ["a"]  # two of three would go on; a failed run never does


def test_the_closing_line():
    assert closing_line(40, 16, 8) == "epochs trained: 40 of the full grid's 128"


# --- the rungs of a sweep (pipeline.rungs), with a fake pool ----------------------------------------


def fake_rung(losses: dict[str, float | None], runs: list):
    """run_rung for run_halving: every point's run ends at once with its loss (None: it failed)."""
    from pipeline.results import Outcome

    def run_rung(rung_points, base):
        runs.append([(point.name, point.overrides) for point in rung_points])
        outcomes = []
        for point in rung_points:
            loss = losses[base[point.name].name]
            stop = next((o.split("=")[1] for o in point.overrides if o.startswith("train.stop_at_epoch=")), None)
            figures = {
                "val_loss": loss,
                "test_accuracy": 0.9,
                "state": f"state-{base[point.name].name}" if stop else "",
            }
            if loss is None:  # a failed run publishes no figures
                outcomes.append(Outcome(point, status="failed", message="train: out of memory"))
                continue
            outcomes.append(Outcome(point, status="done", figures=figures))
        return outcomes

    return run_rung


def test_a_halving_sweep_runs_rungs_of_stopped_points_then_the_plain_finalists():
    from pipeline import results
    from pipeline.grid import Point
    from pipeline.rungs import closing_line_of, eliminated_states, point_rows, run_halving

    points = [Point((f"train.learning_rate={rate}",), f"sweep-lr-{rate}") for rate in ("a", "b", "c", "d")]
    losses = {"sweep-lr-a": 0.4, "sweep-lr-b": 0.1, "sweep-lr-c": None, "sweep-lr-d": 0.2}
    runs, lines = [], []
    result = run_halving(points, 4, 2, fake_rung(losses, runs), lines.append)

    assert [[name for name, _ in rung] for rung in runs] == [
        ["sweep-lr-a-e1", "sweep-lr-b-e1", "sweep-lr-c-e1", "sweep-lr-d-e1"],
        ["sweep-lr-b-e2", "sweep-lr-d-e2"],
        ["sweep-lr-b"],  # the last rung is the plain point: a plain sweep's name and overrides
    ]
    assert runs[0][0][1] == ("train.learning_rate=a", "train.stop_at_epoch=1")
    assert runs[2][0][1] == ("train.learning_rate=b",)
    assert result.epochs_trained() == 2 * 1 + 1 * 2 + 1 * 4
    assert [outcome.point.name for outcome in result.runs] == [name for rung in runs for name, _ in rung]
    assert result.closing_line() == "epochs trained: 8 of the full grid's 16"
    assert any("sweep-lr-b, sweep-lr-d go on by val_loss" in line for line in lines)
    assert [row["decision"] for row in result.decisions[0]] == ["goes on", "goes on", "out", "failed"]

    points_of = {p.name: p for p in point_rows(result)}
    assert {name: (p.experiments, p.cells["epochs"]) for name, p in points_of.items()} == {
        "sweep-lr-a-e1": (("sweep-lr-a-e1",), "1 of 4"),
        "sweep-lr-b": (("sweep-lr-b-e1", "sweep-lr-b-e2", "sweep-lr-b"), "4 of 4"),
        "sweep-lr-c-e1": ((), "1 of 4"),  # failed at the first rung: no experiment, still a row
        "sweep-lr-d-e2": (("sweep-lr-d-e1", "sweep-lr-d-e2"), "2 of 4"),
    }
    assert points_of["sweep-lr-c-e1"].cells["status"] == "failed: train: out of memory"
    compared = [
        {"experiment": name, "rung": "", "rank": ""} for name in ("sweep-lr-b", "sweep-lr-d-e2", "sweep-lr-a-e1")
    ]
    rows = results.leaderboard(["experiment", "rung", "rank"], compared, point_rows(result))
    assert [(row["experiment"], row["epochs"]) for row in rows] == [
        ("sweep-lr-b", "4 of 4"),
        ("sweep-lr-d-e2", "2 of 4"),
        ("sweep-lr-a-e1", "1 of 4"),
        ("sweep-lr-c-e1", "1 of 4"),
    ]
    assert closing_line_of(rows) == result.closing_line()
    assert closing_line_of([*rows, {"experiment": "mean of a, b", "epochs": ""}]) == result.closing_line()
    assert sorted(eliminated_states(result)) == ["state-sweep-lr-a", "state-sweep-lr-d"]


def test_the_sweep_ranks_by_validation_accuracy_when_asked():
    from pipeline.grid import Point
    from pipeline.results import Outcome
    from pipeline.rungs import run_halving

    accuracy = {"p1": 0.6, "p2": 0.9}

    def run_rung(rung_points, base):
        return [Outcome(p, status="done", figures={"val_accuracy": accuracy[base[p.name].name]}) for p in rung_points]

    result = run_halving([Point((), "p1"), Point((), "p2")], 2, 2, run_rung, lambda line: None, metric="val_accuracy")
    assert [record.point.name for record in result.records if record.rung == 1] == ["p2"]


def test_cancel_names_every_rung_as_the_sweep_runs_it():
    """`sweep ... --halving 2 --cancel` cancels the runs of each rung: the names run_halving submits."""
    from pipeline.grid import Point
    from pipeline.rungs import run_halving, rung_epochs, rung_point

    points = [Point(("seed=1",), "p1"), Point(("seed=2",), "p2")]
    runs = []
    run_halving(points, 4, 2, fake_rung({"p1": 0.1, "p2": 0.2}, runs), lambda line: None)
    submitted = {name for rung in runs for name, _ in rung}
    cancelled = {rung_point(p, epochs, 4).name for p in points for epochs in rung_epochs(4, 2)}
    assert submitted <= cancelled == {"p1-e1", "p1-e2", "p1", "p2-e1", "p2-e2", "p2"}
