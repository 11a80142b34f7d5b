"""Synchronous successive halving over a sweep's points: which point trains how far.

Pure functions, no DVC or Prefect: pipeline.sweep runs the rungs. Every point trains to the
first rung; after each rung the best ⌈n/η⌉ by a validation figure go on to the next, and the
last rung is the full budget (`train.epochs`). A promoted point continues from its own
training state (`train.stop_at_epoch` stops a run early and keeps that state), so it trains
only the epochs between two rungs. For 16 points, 8 epochs and η = 2 (rungs at 1, 2, 4, 8):
16 + 8·1 + 4·2 + 2·4 = 40 epochs, against 128 for the whole grid (Li et al., "A System for
Massively Parallel Hyperparameter Tuning", MLSys 2020, synchronous variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# The figures a rung may rank by, and whether higher is better. Never a test figure: the
# choice of points would then be fitted to the test set.
METRICS = {"val_loss": False, "val_accuracy": True}
DEFAULT_METRIC = "val_loss"


class HalvingError(ValueError):
    """A halving sweep that cannot be planned: a bad factor, minimum or metric."""


@dataclass(frozen=True)
class Standing:
    """A point's figure at a rung: None when its run failed (it ranks last)."""

    name: str
    figure: float | None


def rung_epochs(full_epochs: int, eta: int, min_epochs: int = 1) -> list[int]:
    """The epochs each rung trains to: min_epochs, ·η, ·η², ..., and the full budget last."""
    if eta < 2:
        raise HalvingError(f"--halving must be 2 or more (got {eta})")
    if not 1 <= min_epochs <= full_epochs:
        raise HalvingError(f"--min-epochs must be between 1 and train.epochs ({full_epochs}) (got {min_epochs})")
    epochs = [min_epochs]
    while epochs[-1] * eta < full_epochs:
        epochs.append(epochs[-1] * eta)
    if epochs[-1] != full_epochs:
        epochs.append(full_epochs)
    return epochs


def survivors(count: int, eta: int) -> int:
    """How many of `count` points go on to the next rung: ⌈count / η⌉."""
    return math.ceil(count / eta)


def rank(standings: Sequence[Standing], metric: str = DEFAULT_METRIC) -> list[Standing]:
    """Best first by the figure; failed runs last; ties by name, so a rerun decides the same."""
    if metric not in METRICS:
        raise HalvingError(f"--halving-metric must be one of {', '.join(METRICS)} (got {metric})")
    higher_is_better = METRICS[metric]

    def key(standing: Standing):
        if standing.figure is None or math.isnan(standing.figure):
            return (1, 0.0, standing.name)
        return (0, -standing.figure if higher_is_better else standing.figure, standing.name)

    return sorted(standings, key=key)


def promote(standings: Sequence[Standing], eta: int, metric: str = DEFAULT_METRIC) -> list[str]:
    """The names that go on to the next rung: the best ⌈n/η⌉, never a failed run."""
    ranked = rank(standings, metric)
    return [standing.name for standing in ranked[: survivors(len(ranked), eta)] if standing.figure is not None]


def planned_epochs(points: int, full_epochs: int, eta: int, min_epochs: int = 1) -> int:
    """Epochs trained when every rung's survivors continue from their checkpoints."""
    total, count, done = 0, points, 0
    for epochs in rung_epochs(full_epochs, eta, min_epochs):
        total += count * (epochs - done)
        done, count = epochs, survivors(count, eta)
    return total


def closing_line(trained: int, points: int, full_epochs: int) -> str:
    return f"epochs trained: {trained} of the full grid's {points * full_epochs}"
