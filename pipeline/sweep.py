"""Fan a sweep out over a Prefect work pool: the shared data stages once per group, then every point.

Prefect does the distributing: each point is a flow run of the `dvc-experiment/<pool>`
deployment, and each worker of the pool takes one run at a time (`prefect worker start
--limit 1`), so as many experiments run at once as there are free workers. A worker that
dies stops sending flow-run heartbeats; a Prefect automation then marks its run Crashed,
and the sweep submits the point again, on whichever worker is free. The train stage
resumes there from the last epoch mirrored beside the DVC remote (convnets.resume).

Nothing is kept here that a restart would lose:
- a point is done when it is home: its git refs in the git remote (refs/exps, pushed last by
  pipeline.experiment.push_home) and its outputs in the DVC remote (checked: results_home);
- a point's flow runs carry a tag naming the point (run_identity) and an idempotency key
  naming the attempt, so a sweep run again, after Ctrl-C, a lost API or a reboot, finds
  the run still in flight and waits for it instead of starting a second one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from pipeline.dvc import DvcError
from pipeline.experiment import outputs_not_home
from pipeline.grid import Point, SweepError
from pipeline.prefect_api import (
    ExperimentDeployment,
    artifact_key,
    cancel_run,
    check_pool,
    ensure_crash_detection,
    ensure_deployment,
    latest_table,
    online_workers,
    runs_tagged,
)
from pipeline.results import Outcome, Target
from pipeline.waiting import PAST_DEADLINE, past, wait_for
from pipeline.workspace import WorkspaceError, ls_remote, redact

DEFAULT_RETRIES = 2
DATA_POOL = "cpu"  # where a sweep's data stages go by default, when a worker polls it
EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/(.+)$")
SWEEP_TAG = "convnets-sweep"
# What a point's summary artifact carries for the sweep (pipeline.experiment.read_figures): the test
# figures for the tables, the validation ones a halving sweep ranks by, the state a stopped rung kept.
FIGURES = ("test_accuracy", "roc_auc", "best_epoch", "epochs", "val_loss", "val_accuracy", "state")


class SweepInterrupted(RuntimeError):
    """Ctrl-C: the sweep stopped waiting; the message says which runs go on and how to cancel them."""


@dataclass(frozen=True)
class Bounds:
    """How long a sweep waits: run_timeout_s, the most one run may stay RUNNING (None: its pool's
    default, pipeline.waiting.run_timeout_for); deadline, a time.monotonic() past which whatever
    has not ended is cancelled (None: none)."""

    run_timeout_s: float | None = None
    deadline: float | None = None


def experiments_on_remote(repository: str, commit: str) -> set[str]:
    """Names of the experiments of `commit` in the git remote (DVC keeps them as refs/exps/...)."""
    try:
        refs = ls_remote(repository, "refs/exps/*")
    except WorkspaceError as exc:
        raise SweepError(f"cannot list the experiments in {redact(repository)}: {exc}") from None
    matches = (EXP_REF.match(ref) for _, ref in refs)
    return {m.group(3) for m in matches if m and m.group(1) + m.group(2) == commit}


def exp_ref(commit: str, name: str) -> str:
    """Where DVC keeps experiment `name` of `commit`, locally and in the git remote."""
    return f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"


def results_home(target: Target, names: Sequence[str], log: Callable[[str], None]) -> tuple[set[str], set[str]]:
    """Of `names`, those that are home: their refs in the git remote and every output of their
    dvc.lock in the DVC remote; and those whose refs are there without all their outputs (a push
    the DVC remote refused, or refs pushed first by an older version): they run again, and replace them."""
    on_remote = experiments_on_remote(target.repository, target.commit) & set(names)
    if not on_remote:
        return set(), set()
    refs = {name: exp_ref(target.commit, name) for name in sorted(on_remote)}
    try:
        missing = outputs_not_home(target.repository, target.commit, target.dvc_remote, refs)
    except (WorkspaceError, DvcError) as exc:
        raise SweepError(f"cannot check which experiments' outputs the DVC remote has: {exc}") from None
    stale = {name for name, paths in missing.items() if paths}
    for name in sorted(stale):
        shown = ", ".join(missing[name][:3]) + (f" and {len(missing[name]) - 3} more" if len(missing[name]) > 3 else "")
        log(f"{name}: in {redact(target.repository)}, but the DVC remote lacks {shown}: it runs again")
    return on_remote - stale, stale


# --- one run per point, whichever sweep asks -------------------------------------------------


def run_identity(target: Target, point: Point | None = None, data_artifact: str | None = None) -> str:
    """The tag every flow run of this work carries: a point of `target`'s commit into its remotes, or
    (with data_artifact) the data stages of a group. Its attempts differ in their idempotency key only."""
    what = {"repository": target.repository, "commit": target.commit, "dvc_remote": target.dvc_remote}
    if data_artifact:
        what["data"] = data_artifact
    elif point is not None:
        what.update(name=point.name, overrides=list(point.overrides))
    return "convnets-run-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def attempt_of(flow_run, identity: str) -> int:
    """The attempt an earlier flow run of `identity` was (0 if its key is not ours)."""
    number = (flow_run.idempotency_key or "").removeprefix(f"{identity}-")
    return int(number) if number.isdigit() else 0


def sweep_identities(points: Sequence[Point], target: Target, data_groups: dict[str, list[Point]]) -> list[str]:
    """The tags of every run a sweep of `points` may have in flight: its points and its groups' data stages."""
    return [run_identity(target, point) for point in points] + [
        run_identity(target, data_artifact=data_artifact(key)) for key in data_groups
    ]


def submit(
    deployment: str,
    target: Target,
    point: Point,
    data_stages: Sequence[str] | None = None,
    data_lock: dict | None = None,
    data_artifact: str | None = None,
    replace: bool = False,
) -> UUID:
    """The flow run of this point (or, with data_stages, of its group's data stages): the one still
    in flight if there is one, else the next attempt.

    The attempt's idempotency key makes the server hand back the run that another sweep has just
    created for it rather than make a second one. A crashed, failed or cancelled attempt has
    ended; to retry it is to submit the next attempt. replace: see pipeline.experiment.push_home.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    identity = run_identity(target, point, data_artifact)
    with get_client(sync_client=True) as client:
        earlier = runs_tagged(client, [identity])
    live = [run for run in earlier if run.state is None or not run.state.is_final()]
    if live:
        return live[0].id
    attempt = 1 + max((attempt_of(run, identity) for run in earlier), default=0)
    parameters = {
        "repository": target.repository,
        "commit": target.commit,
        "overrides": list(point.overrides),
        "name": point.name,
        "dvc_remote": target.dvc_remote,
        "data_stages": list(data_stages) if data_stages else None,
        "data_lock": data_lock,
        "data_artifact": data_artifact,
    }
    if replace:  # only then: a worker on an older pipeline/ still takes the others
        parameters["replace"] = True
    flow_run = run_deployment(
        deployment,
        timeout=0,
        flow_run_name=point.name + ("-data" if data_stages else ""),
        parameters=parameters,
        tags=[SWEEP_TAG, identity],
        idempotency_key=f"{identity}-{attempt}",
    )
    return flow_run.id


def adopt_live_runs(outcomes: list[Outcome], target: Target, log: Callable[[str], None]) -> None:
    """Points whose flow run from an earlier sweep has not ended: that run is waited for, not doubled."""
    from prefect.client.orchestration import get_client

    by_identity = {run_identity(target, outcome.point): outcome for outcome in outcomes}
    with get_client(sync_client=True) as client:
        live = runs_tagged(client, list(by_identity), live_only=True)
    for run in live:
        outcome = next(by_identity[tag] for tag in run.tags if tag in by_identity)
        if outcome.flow_run_id is None:
            outcome.flow_run_id, outcome.attempts = run.id, 1
            log(f"{outcome.point.name}: its flow run {run.name} ({run.id}) has not ended: waiting for it, not another")


def going_on(identities: Sequence[str]) -> str:
    """One line for Ctrl-C: the runs that go on without the sweep, and how to stop them."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            live = runs_tagged(client, identities, live_only=True)
    except Exception:  # the API is gone too: say what holds anyway
        return (
            "interrupted: the runs already submitted go on; the same command again waits for them, "
            "and with --cancel cancels them"
        )
    if not live:
        return "interrupted: no run of this sweep is left in flight"
    runs = ", ".join(f"{run.name} ({run.id})" for run in sorted(live, key=lambda run: run.name))
    return (
        f"interrupted: {len(live)} flow run(s) go on: {runs}; the same command again waits for them, "
        "and with --cancel cancels them (one: `prefect flow-run cancel <id>`)"
    )


def cancel_runs(points: Sequence[Point], target: Target, data_groups: dict[str, list[Point]]) -> list[str]:
    """Cancel the runs of these points, and of their data stages, that have not ended; their names."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        live = runs_tagged(client, sweep_identities(points, target, data_groups), live_only=True)
        for run in live:
            cancel_run(client, run)
    return [run.name for run in live]


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
            outcome.figures = {k: row.get(k) for k in FIGURES}
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
    bounds: Bounds | None = None,
) -> list[Outcome]:
    """Run the points not yet home as flow runs of `flow` (pipeline.flows.dvc_experiment); the
    shared data stages of each group run first, once, on `data_pool` (see choose_data_pool).
    bounds: how long one run may stay RUNNING, and the sweep's deadline (pipeline.waiting.wait_for).

    data_groups: the points by the params their data stages read and the code they run (grid.data_key).
    A group whose data stages an earlier data-stage run already ran, at this commit or at one whose
    data stages are the same, (its dvc.lock entries are published) runs none: its points get those
    entries, as they would get a new run's.
    Ctrl-C raises SweepInterrupted, saying which runs go on.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        check_pool(client, target.pool)
        deployment = ensure_deployment(client, flow, target.pool)
        data_pool = choose_data_pool(client, data_pool, target.pool) if data_stages else target.pool
        data_deployment = deployment if data_pool == target.pool else ensure_deployment(client, flow, data_pool)
    for registered in dict.fromkeys([deployment, data_deployment]):
        ensure_crash_detection(registered)
    try:
        return fan_out(
            points,
            target,
            data_groups,
            data_stages,
            timeout_s,
            retries,
            log,
            (deployment, data_deployment),
            bounds or Bounds(),
        )
    except KeyboardInterrupt:
        raise SweepInterrupted(going_on(sweep_identities(points, target, data_groups))) from None


def fan_out(
    points: list[Point],
    target: Target,
    data_groups: dict[str, list[Point]],
    data_stages: Sequence[str],
    timeout_s: float,
    retries: int,
    log: Callable[[str], None],
    deployments: tuple[ExperimentDeployment, ExperimentDeployment],
    bounds: Bounds,
) -> list[Outcome]:
    """run_points once the deployments are there: adopt, check what is home, run the data stages, submit, wait."""
    deployment, data_deployment = deployments
    outcomes = [Outcome(p) for p in points]
    adopt_live_runs(outcomes, target, log)
    done, stale = results_home(target, [o.point.name for o in outcomes if o.flow_run_id is None], log)
    for outcome in outcomes:
        if outcome.point.name in done:
            outcome.status = "already done"
    if done:
        log(f"already home in {redact(target.repository)}, not run again: " + ", ".join(sorted(done)))
    todo = not_past_deadline([o for o in outcomes if o.status == "pending"], bounds.deadline)
    if not todo:
        read_summaries(outcomes, target.commit)
        return outcomes

    # point name -> the dvc.lock entries of its data stages, from an earlier or a new data-stage run
    claimed = {o.point.name for o in outcomes if o.status != "pending" or o.flow_run_id is not None}
    locks, shared = plan_data_runs(data_groups, claimed, published_lock)
    if locks:
        log(f"data stages already run for this code and data params, their dvc.lock handed to: {', '.join(locks)}")
    if shared and data_stages:
        data = Target(target.repository, target.commit, target.dvc_remote, data_deployment.pool)
        locks.update(
            prepare_data(shared, data_deployment.name, data, data_stages, (timeout_s, retries, bounds), log, outcomes)
        )

    def submit_point(point: Point) -> UUID:
        return submit(deployment.name, target, point, data_lock=locks.get(point.name), replace=point.name in stale)

    new = not_past_deadline([o for o in todo if o.status == "pending" and o.flow_run_id is None], bounds.deadline)
    for outcome in new:
        outcome.flow_run_id = submit_point(outcome.point)
        outcome.attempts = 1
    log(f"submitted {len(new)} experiment(s) to pool {target.pool!r}")
    wait_for(todo, target.pool, timeout_s, log, retries, submit_point, bounds.run_timeout_s, bounds.deadline)
    read_summaries(outcomes, target.commit)
    return outcomes


def not_past_deadline(outcomes: list[Outcome], deadline: float | None) -> list[Outcome]:
    """`outcomes`, to be submitted; none once the sweep's deadline has passed (a later rung of a
    halving sweep, the points after a slow data-stage run): those count as PAST_DEADLINE."""
    if not past(deadline):
        return outcomes
    for outcome in outcomes:
        outcome.status, outcome.message = PAST_DEADLINE, "the sweep's --deadline passed before it was submitted"
    return []


def plan_data_runs(
    data_groups: dict[str, list[Point]], done: set[str], published: Callable[[str], dict[str, dict]]
) -> tuple[dict[str, dict], dict[str, list[Point]]]:
    """The dvc.lock entries of the points whose data stages already ran (`published` looks them up
    by data key), and the groups of two or more points left to run them once for. done: the
    points that need no run (home already, or their run is in flight)."""
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
    waits: tuple[float, int, Bounds],
    log: Callable[[str], None],
    outcomes: list[Outcome],
) -> dict[str, dict]:
    """One run of the data stages per group of points that share them; their results go to the run cache.

    Returns, for each point of a group whose run succeeded, the dvc.lock entries that run
    published (data_lock of pipeline.flows.dvc_experiment). waits: timeout_s, retries and
    bounds, as for wait_for.
    """
    timeout_s, retries, bounds = waits
    runs, artifacts = [], {}
    for key, group in groups.items():
        first = group[0]
        artifacts[first.name] = data_artifact(key)
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
        bounds.run_timeout_s,
        bounds.deadline,
    )
    by_name = {o.point.name: o for o in outcomes}
    locks: dict[str, dict] = {}
    for run, key, group in runs:
        if run.status == "done":
            entries = published_lock(key)
            locks.update({point.name: entries for point in group if entries})
            continue
        for point in group:
            outcome = by_name[point.name]
            if outcome.status == "pending":
                outcome.status, outcome.message = run.status, f"data stages: {run.message}"
    return locks


def data_artifact(data_key: str) -> str:
    """The artifact a data-stage run publishes its dvc.lock entries in, by what its stages run and read
    (grid.data_key: the data params and the data stages' code, whichever commit has them)."""
    return artifact_key("data", hashlib.sha256(data_key.encode()).hexdigest()[:16])


def published_lock(data_key: str) -> dict[str, dict]:
    """The dvc.lock entries a data-stage run published for this data key ({} if none)."""
    rows = latest_table(data_artifact(data_key))
    try:
        return {row["stage"]: json.loads(row["entry"]) for row in rows}
    except (KeyError, TypeError, ValueError):
        return {}  # not what dvc_experiment writes: the points then pull the data as before
