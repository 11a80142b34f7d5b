"""The scheduled run's memory: what the previous run of a branch trained, read from its Prefect artifact.

Each nightly run publishes a table artifact under a key of its branch and its overrides; Prefect
keeps every version of a keyed artifact, so the latest one is the previous run's. The overrides
are part of the key, and of the experiment's name, so that a dogs-vs-cats nightly never takes a
default one of the same commit for its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import grid, workspace
from pipeline.prefect_api import artifact_key as keyed_artifact
from pipeline.prefect_api import latest_table
from pipeline.results import Outcome, duration, number

METRICS = ("test_accuracy", "roc_auc", "best_epoch")


def overrides_tag(overrides: Sequence[str] | None) -> list[str]:
    """[] for the defaults (a default nightly keeps its names), else [a digest of the overrides].

    Sorted by key, so that their order on the command line does not matter; the sort is stable,
    so two overrides of one key keep their order, on which the value they give depends.
    """
    if not overrides:
        return []
    return [grid.digest(sorted(overrides, key=lambda override: override.split("=", 1)[0]))]


def experiment_name(commit: str, overrides: Sequence[str] | None) -> str:
    """nightly-<sha7>, then the overrides' digest if there are any."""
    return "-".join(["nightly", commit[:7], *overrides_tag(overrides)])


def artifact_key(branch: str, overrides: Sequence[str] | None = None, suffix: str = "metrics") -> str:
    return keyed_artifact("nightly", branch, *overrides_tag(overrides), suffix)


def previous_run(branch: str, overrides: Sequence[str] | None = None) -> dict | None:
    """{"commit": ..., metric: value} of the last nightly run of `branch` with these overrides, or None."""
    rows = latest_table(artifact_key(branch, overrides))
    return {row["metric"]: row.get("value") for row in rows if "metric" in row} or None


def check_before_submitting(point: grid.Point, repository: str, commit: str) -> None:
    """SweepError, before anything is submitted, if the run's fetch would read a path only one machine has.

    The branch head's params exist only in a clone of it, so they are composed there (the
    overrides applied as `dvc exp run -S` would). Only what a worker could not read is checked
    (grid.worker_path_problem): the full params model is this worker's installed code, which may
    be older than the branch head's and refuse a key the head has added; its own stages check that.
    """
    with workspace.clean_checkout(repository, commit, f"{point.name}-check") as checkout:
        grid.check_point(checkout, point, validate=False)


def comparison_rows(outcome: Outcome, commit: str, previous: dict | None) -> list[dict]:
    """metric, value (kept raw for the next run), this run, previous run, change."""
    before = previous or {}
    rows = [
        {
            "metric": "commit",
            "value": commit,
            "this run": commit[:7],
            "previous run": str(before.get("commit", ""))[:7],
            "change": "",
        },
        {
            "metric": "status",
            "value": outcome.status,
            "this run": outcome.status,
            "previous run": before.get("status", ""),
            "change": "",
        },
        {
            "metric": "wall time",
            "value": outcome.seconds,
            "this run": duration(outcome.seconds),
            "previous run": duration(before.get("wall time")),
            "change": "",
        },
    ]
    for key in METRICS:
        now, then = outcome.figures.get(key), before.get(key)
        change = number(now - then) if isinstance(now, (int, float)) and isinstance(then, (int, float)) else ""
        rows.append(
            {
                "metric": key,
                "value": now,
                "this run": number(now) if key != "best_epoch" else str(now or ""),
                "previous run": number(then) if key != "best_epoch" else str(then or ""),
                "change": change,
            }
        )
    return rows
