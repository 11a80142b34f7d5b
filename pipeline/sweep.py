"""Fan a sweep out over a Prefect work pool: the shared data stages once per group, then every point.

Prefect does the distributing: each point is a flow run of the `dvc-experiment/<pool>`
deployment, and each worker of the pool takes one run at a time (`prefect worker start
--limit 1`), so as many experiments run at once as there are free workers. A worker that
dies stops sending flow-run heartbeats; a Prefect automation then marks its run Crashed,
and the sweep submits the point again, on whichever worker is free. The train stage
resumes there from the last epoch mirrored beside the DVC remote (convnets.resume).

Nothing is kept here that a restart would lose: finished experiments are in the git remote
(refs/exps, as `dvc exp push` writes them), so a sweep run again skips them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from uuid import UUID

from pipeline.grid import Point, SweepError
from pipeline.prefect_api import (
    artifact_key,
    check_pool,
    ensure_crash_detection,
    ensure_deployment,
    heartbeat_seconds,
    latest_table,
    online_workers,
)
from pipeline.results import Outcome, Target
from pipeline.waiting import wait_for
from pipeline.workspace import WorkspaceError, ls_remote, redact

DEFAULT_RETRIES = 2
DATA_POOL = "cpu"  # where a sweep's data stages go by default, when a worker polls it
EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/(.+)$")


def experiments_on_remote(repository: str, commit: str) -> set[str]:
    """Names of the experiments of `commit` in the git remote (DVC keeps them as refs/exps/...)."""
    try:
        refs = ls_remote(repository, "refs/exps/*")
    except WorkspaceError as exc:
        raise SweepError(f"cannot list the experiments in {redact(repository)}: {exc}") from None
    matches = (EXP_REF.match(ref) for _, ref in refs)
    return {m.group(3) for m in matches if m and m.group(1) + m.group(2) == commit}


def submit(
    deployment: str,
    target: Target,
    point: Point,
    data_stages: Sequence[str] | None = None,
    data_lock: dict | None = None,
    data_artifact: str | None = None,
) -> UUID:
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment,
        timeout=0,
        flow_run_name=point.name + ("-data" if data_stages else ""),
        parameters={
            "repository": target.repository,
            "commit": target.commit,
            "overrides": list(point.overrides),
            "name": point.name,
            "dvc_remote": target.dvc_remote,
            "data_stages": list(data_stages) if data_stages else None,
            "data_lock": data_lock,
            "data_artifact": data_artifact,
        },
        tags=["convnets-sweep"],
    )
    return flow_run.id


def read_summaries(outcomes: list[Outcome], commit: str) -> None:
    """Host and figures of each experiment, from the table artifact its flow run published."""
    for outcome in outcomes:
        if not outcome.ok:
            continue
        rows = latest_table(artifact_key("experiment", commit[:7], outcome.point.name))
        if rows:
            row = rows[0]
            outcome.host = outcome.host or row.get("worker", "")
            outcome.lock = row.get("lock") or ""
            outcome.figures = {k: row.get(k) for k in ("test_accuracy", "roc_auc", "best_epoch", "epochs")}
            if outcome.seconds is None and isinstance(row.get("seconds"), (int, float)):
                outcome.seconds = row["seconds"]


def run_points(
    flow,
    points: list[Point],
    target: Target,
    data_groups: dict[str, list[Point]],
    data_stages: Sequence[str],
    timeout_s: float,
    retries: int,
    log: Callable[[str], None],
    data_pool: str | None = None,
) -> list[Outcome]:
    """Run the points not yet in the git remote as flow runs of `flow` (pipeline.flows.dvc_experiment);
    the shared data stages of each group run first, once, on `data_pool` (see choose_data_pool).

    data_groups: the points by the params their data stages read (grid.data_key). A group whose
    data stages an earlier data-stage run of this commit already ran (its dvc.lock entries are
    published) runs none: its points get those entries, as they would get a new run's.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        check_pool(client, target.pool)
        deployment = ensure_deployment(client, flow, target.pool)
        data_pool = choose_data_pool(client, data_pool, target.pool) if data_stages else target.pool
        data_deployment = deployment if data_pool == target.pool else ensure_deployment(client, flow, data_pool)
    ensure_crash_detection(heartbeat_seconds())
    done = experiments_on_remote(target.repository, target.commit)
    outcomes = [Outcome(p, status="already done" if p.name in done else "pending") for p in points]
    if done & {p.name for p in points}:
        log(
            f"already in {redact(target.repository)}, not run again: "
            + ", ".join(p.name for p in points if p.name in done)
        )
    todo = [o for o in outcomes if o.status == "pending"]
    if not todo:
        read_summaries(outcomes, target.commit)
        return outcomes

    # point name -> the dvc.lock entries of its data stages, from an earlier or a new data-stage run
    locks, shared = plan_data_runs(data_groups, done, lambda key: published_lock(target.commit, key))
    if locks:
        log(f"data stages already run for {target.commit[:7]}, their dvc.lock handed to: {', '.join(locks)}")
    if shared and data_stages:
        data = Target(target.repository, target.commit, target.dvc_remote, data_pool)
        locks.update(prepare_data(shared, data_deployment, data, data_stages, timeout_s, retries, log, outcomes))

    def submit_point(point: Point) -> UUID:
        return submit(deployment, target, point, data_lock=locks.get(point.name))

    for outcome in todo:
        if outcome.status == "pending":
            outcome.flow_run_id = submit_point(outcome.point)
            outcome.attempts = 1
    log(f"submitted {sum(o.flow_run_id is not None for o in todo)} experiment(s) to pool {target.pool!r}")
    wait_for(todo, target.pool, timeout_s, log, retries, submit_point)
    read_summaries(outcomes, target.commit)
    return outcomes


def plan_data_runs(
    data_groups: dict[str, list[Point]], done: set[str], published: Callable[[str], dict[str, dict]]
) -> tuple[dict[str, dict], dict[str, list[Point]]]:
    """The dvc.lock entries of the points whose data stages already ran (`published` looks them up
    by data key), and the groups of two or more points left to run them once for."""
    locks: dict[str, dict] = {}
    shared: dict[str, list[Point]] = {}
    for key, group in data_groups.items():
        todo = [point for point in group if point.name not in done]
        entries = published(key) if todo else {}
        if entries:
            locks.update({point.name: entries for point in todo})
        elif len(todo) > 1:
            shared[key] = todo
    return locks, shared


def choose_data_pool(client, requested: str | None, experiment_pool: str) -> str:
    """Where the data stages run: the pool asked for, else `cpu` when a worker polls it (GPU
    workers should not spend their time decoding photos), else the experiments' pool."""
    if requested:
        check_pool(client, requested)
        return requested
    try:
        return DATA_POOL if online_workers(client, DATA_POOL) else experiment_pool
    except Exception:  # no such pool on this server
        return experiment_pool


def prepare_data(
    groups: dict[str, list[Point]],
    deployment: str,
    target: Target,
    data_stages: Sequence[str],
    timeout_s: float,
    retries: int,
    log: Callable[[str], None],
    outcomes: list[Outcome],
) -> dict[str, dict]:
    """One run of the data stages per group of points that share them; their results go to the run cache.

    Returns, for each point of a group whose run succeeded, the dvc.lock entries that run
    published (data_lock of pipeline.flows.dvc_experiment).
    """
    runs, artifacts = [], {}
    for key, group in groups.items():
        first = group[0]
        artifacts[first.name] = data_artifact(target.commit, key)
        flow_run_id = submit(deployment, target, first, data_stages, data_artifact=artifacts[first.name])
        runs.append((Outcome(first, flow_run_id=flow_run_id, attempts=1), key, group))
    log(
        f"running the data stages ({', '.join(data_stages)}) once for {len(groups)} group(s) of experiments "
        f"on pool {target.pool!r}"
    )
    wait_for(
        [run for run, _, _ in runs],
        target.pool,
        timeout_s,
        log,
        retries,
        lambda point: submit(deployment, target, point, data_stages, data_artifact=artifacts[point.name]),
    )
    by_name = {o.point.name: o for o in outcomes}
    locks: dict[str, dict] = {}
    for run, key, group in runs:
        if run.status == "done":
            entries = published_lock(target.commit, key)
            locks.update({point.name: entries for point in group if entries})
            continue
        for point in group:
            outcome = by_name[point.name]
            if outcome.status == "pending":
                outcome.status, outcome.message = run.status, f"data stages: {run.message}"
    return locks


def data_artifact(commit: str, data_key: str) -> str:
    """The artifact a data-stage run of `commit` publishes its dvc.lock entries in, by its data params."""
    return artifact_key("data", commit[:7], hashlib.sha256(data_key.encode()).hexdigest()[:12])


def published_lock(commit: str, data_key: str) -> dict[str, dict]:
    """The dvc.lock entries a data-stage run of `commit` published for these data params ({} if none)."""
    rows = latest_table(data_artifact(commit, data_key))
    try:
        return {row["stage"]: json.loads(row["entry"]) for row in rows}
    except (KeyError, TypeError, ValueError):
        return {}  # not what dvc_experiment writes: the points then pull the data as before
