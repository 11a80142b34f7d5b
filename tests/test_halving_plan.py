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
