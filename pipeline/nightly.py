"""The scheduled run's memory: what the previous run of a branch trained, read from its Prefect artifact.

Each nightly run publishes a table artifact under a key of its branch; Prefect keeps
every version of a keyed artifact, so the latest one is the previous run's.
"""

from __future__ import annotations

import json
import re

from pipeline.sweep import Outcome, duration, number

METRICS = (("test_accuracy", "test accuracy"), ("roc_auc", "ROC AUC"), ("best_epoch", "best epoch"))


def artifact_key(branch: str, suffix: str = "metrics") -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"nightly-{branch}-{suffix}".lower()).strip("-")


def previous_run(branch: str) -> dict | None:
    """{"commit": ..., metric: value} of the last nightly run of `branch` that trained, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(branch)])),
            sort=ArtifactSort.UPDATED_DESC,
            limit=1,
        )
    if not found:
        return None
    rows = json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data
    return {row["metric"]: row.get("value") for row in rows or [] if "metric" in row}


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
    for key, label in METRICS:
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
