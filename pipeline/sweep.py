"""Fan a sweep out over a Prefect work pool, wait for it, and report one row per experiment.

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

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from pipeline.grid import Point, SweepError
from pipeline.workspace import KeepCheckout, WorkspaceError, ls_remote, redact

EXPERIMENT_FLOW = "dvc-experiment"
PULL_STEPS = [{"pipeline.workspace.enter_work_folder": {}}]
CRASH_AUTOMATION = "convnets: mark silent dvc-experiment runs crashed"
POLL_S = 2.0
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 2
API_PATIENCE_S = 600.0  # how long a restarting Prefect server is waited for
HEARTBEATS_MISSED = 3  # a run is declared crashed after this many silent heartbeat periods
EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/(.+)$")

FINAL_OK = "COMPLETED"
NOT_STARTED = {"SCHEDULED", "PENDING"}


class ExperimentsFailed(RuntimeError):
    """Some experiments of a sweep did not come home; `rows` is the whole table."""

    def __init__(self, outcomes: list[Outcome], rows: list[dict[str, str]] | None = None):
        failed = [o for o in outcomes if not o.ok]
        super().__init__(
            f"{len(failed)} experiment(s) failed: " + "; ".join(f"{o.point.name} ({o.status})" for o in failed)
        )
        self.failed = [o.point.name for o in failed]
        self.rows = rows or []


@dataclass(frozen=True)
class Target:
    """Where the points run: which commit of which repository, which DVC remote, which pool."""

    repository: str
    commit: str
    dvc_remote: str | None
    pool: str


@dataclass
class Outcome:
    point: Point
    status: str = "pending"  # done | already done | failed | crashed | no worker | not pushed
    message: str = ""
    figures: dict = field(default_factory=dict)
    host: str = ""
    lock: str = ""  # the uv.lock hash (short) of the environment it ran in
    seconds: float | None = None
    attempts: int = 0
    flow_run_id: UUID | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "already done")


# --- what the git remote already has ------------------------------------------------------


def experiments_on_remote(repository: str, commit: str) -> set[str]:
    """Names of the experiments of `commit` in the git remote (DVC keeps them as refs/exps/...)."""
    try:
        refs = ls_remote(repository, "refs/exps/*")
    except WorkspaceError as exc:
        raise SweepError(f"cannot list the experiments in {redact(repository)}: {exc}") from None
    matches = (EXP_REF.match(ref) for _, ref in refs)
    return {m.group(3) for m in matches if m and m.group(1) + m.group(2) == commit}


# --- Prefect: pool, deployment, crash detection -------------------------------------------


def check_pool(client, pool: str) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise SweepError(
            f"no work pool {pool!r} on the Prefect server: create it with "
            f"`prefect work-pool create {pool} --type process` and start workers on it"
        ) from None


def ensure_deployment(client, pool: str) -> str:
    """The `dvc-experiment/<pool>` deployment, created or updated from the installed flow."""
    from prefect.utilities.callables import parameter_schema

    from pipeline.flows import dvc_experiment

    flow_id = client.create_flow(dvc_experiment)
    client.create_deployment(
        flow_id=flow_id,
        name=pool,
        work_pool_name=pool,
        entrypoint="pipeline.flows.dvc_experiment",
        pull_steps=PULL_STEPS,
        parameter_openapi_schema=parameter_schema(dvc_experiment).model_dump_for_openapi(),
        description="One DVC experiment in a clean clone at the requested commit (python -m pipeline sweep).",
    )
    return f"{EXPERIMENT_FLOW}/{pool}"


def ensure_crash_detection(heartbeat_s: int) -> None:
    """The automation Prefect documents for zombie flow runs, for our experiment runs only."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=CRASH_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=CRASH_AUTOMATION,
        description="A dvc-experiment flow run whose heartbeats stopped (worker killed or preempted).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": EXPERIMENT_FLOW}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_s * HEARTBEATS_MISSED),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {heartbeat_s * HEARTBEATS_MISSED} s: "
                "its worker stopped (killed, preempted or lost)",
            )
        ],
    ).create()


def heartbeat_seconds() -> int:
    from prefect.settings import get_current_settings

    return int(get_current_settings().flows.heartbeat_frequency or 180)


def online_workers(client, pool: str) -> int:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    workers = client.read_workers_for_work_pool(
        pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    )
    return len(workers)


# --- submitting and waiting ------------------------------------------------------------------


def submit(deployment: str, target: Target, point: Point, data_stages: Sequence[str] | None = None) -> UUID:
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
        },
        tags=["convnets-sweep"],
    )
    return flow_run.id


def wait_for(
    outcomes: list[Outcome],
    pool: str,
    timeout_s: float,
    log: Callable[[str], None],
    retries: int = 0,
    resubmit: Callable[[Point], UUID] | None = None,
) -> None:
    """Poll the flow runs until each has ended; resubmit crashed ones (up to `retries` times,
    with `resubmit`); give up when no worker polls `pool` for timeout_s."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    pending = {o.flow_run_id: o for o in outcomes if o.flow_run_id is not None and o.status == "pending"}
    no_worker_since: float | None = None
    api_down_since: float | None = None
    while pending:
        time.sleep(POLL_S)
        try:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))))
                workers = online_workers(client, pool)
            api_down_since = None
        except Exception as exc:  # a restarting server: finished experiments are safe in git
            api_down_since = api_down_since or time.monotonic()
            if time.monotonic() - api_down_since > API_PATIENCE_S:
                raise SweepError(
                    f"the Prefect API has not answered for {API_PATIENCE_S:.0f} s ({exc}); "
                    "finished experiments are in the git remote: run the same sweep again"
                ) from None
            log(f"the Prefect API did not answer ({type(exc).__name__}); trying again")
            continue
        waiting = False
        for run in runs:
            outcome = pending[run.id]
            state = run.state.type.value if run.state else "SCHEDULED"
            if state in NOT_STARTED:
                waiting = True
            elif state == "CRASHED" and resubmit is not None and outcome.attempts <= retries:
                del pending[run.id]
                log(
                    f"{outcome.point.name}: flow run {run.name} crashed ({run.state.message}); "
                    f"submitting it again (attempt {outcome.attempts + 1})"
                )
                outcome.flow_run_id = resubmit(outcome.point)
                outcome.attempts += 1
                pending[outcome.flow_run_id] = outcome
            elif run.state and run.state.is_final():
                del pending[run.id]
                finish(outcome, run)
                log(f"{outcome.point.name}: {outcome.status}" + (f": {outcome.message}" if outcome.message else ""))
        if waiting and workers == 0:
            no_worker_since = no_worker_since or time.monotonic()
            if time.monotonic() - no_worker_since > timeout_s:
                give_up_waiting(pending, pool, timeout_s)
                return
        else:
            no_worker_since = None


def finish(outcome: Outcome, run) -> None:
    state = run.state
    outcome.seconds = run.total_run_time.total_seconds() if run.total_run_time else None
    if state.type.value == FINAL_OK:
        outcome.status = "done"
        return
    message = state.message or state.name
    outcome.status = "not pushed" if f"{KeepCheckout.__name__}:" in message else state.name.lower()
    outcome.message = message


def give_up_waiting(pending: dict, pool: str, timeout_s: float) -> None:
    """No worker polled the pool for timeout_s: cancel what has not started."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        for run_id, outcome in pending.items():
            client.set_flow_run_state(run_id, Cancelled(message=f"no worker on pool {pool!r}"), force=True)
            outcome.status = "no worker"
            outcome.message = (
                f"no worker polled pool {pool!r} for {timeout_s:.0f} s: start one with "
                f"`prefect worker start --pool {pool} --limit 1`"
            )


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


def latest_table(key: str) -> list[dict]:
    """The rows of the newest version of a keyed table artifact ([] if there is none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.UPDATED_DESC, limit=1
        )
    if not found:
        return []
    data = found[0].data
    return (json.loads(data) if isinstance(data, str) else data) or []


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def run_points(
    points: list[Point],
    target: Target,
    data_groups: list[list[Point]],
    data_stages: Sequence[str],
    timeout_s: float,
    retries: int,
    log: Callable[[str], None],
) -> list[Outcome]:
    """Run the points not yet in the git remote; the shared data stages of each group run first, once."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        check_pool(client, target.pool)
        deployment = ensure_deployment(client, target.pool)
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

    groups = [g for g in data_groups if len([p for p in g if p.name not in done]) > 1]
    if groups and data_stages:
        prepare_data(groups, deployment, target, data_stages, timeout_s, retries, log, outcomes)
    for outcome in todo:
        if outcome.status == "pending":
            outcome.flow_run_id = submit(deployment, target, outcome.point)
            outcome.attempts = 1
    log(f"submitted {sum(o.flow_run_id is not None for o in todo)} experiment(s) to pool {target.pool!r}")
    wait_for(todo, target.pool, timeout_s, log, retries, lambda point: submit(deployment, target, point))
    read_summaries(outcomes, target.commit)
    return outcomes


def prepare_data(
    groups: list[list[Point]],
    deployment: str,
    target: Target,
    data_stages: Sequence[str],
    timeout_s: float,
    retries: int,
    log: Callable[[str], None],
    outcomes: list[Outcome],
) -> None:
    """One run of the data stages per group of points that share them; their results go to the run cache."""
    runs = []
    for group in groups:
        first = group[0]
        run = Outcome(first, flow_run_id=submit(deployment, target, first, data_stages), attempts=1)
        runs.append((run, group))
    log(f"running the data stages ({', '.join(data_stages)}) once for {len(groups)} group(s) of experiments")
    wait_for(
        [run for run, _ in runs],
        target.pool,
        timeout_s,
        log,
        retries,
        lambda point: submit(deployment, target, point, data_stages),
    )
    by_name = {o.point.name: o for o in outcomes}
    for run, group in runs:
        if run.status == "done":
            continue
        for point in group:
            outcome = by_name[point.name]
            if outcome.status == "pending":
                outcome.status, outcome.message = run.status, f"data stages: {run.message}"


# --- the table ------------------------------------------------------------------------------------


def leaderboard(outcomes: list[Outcome]) -> list[dict[str, str]]:
    """One row per experiment, best test accuracy first; failed ones last with their error.

    The figures lead (as in convnets.compare), then the overrides, shortened: a path to its file
    name, a hash to 8 characters, so that an archive's absolute path and its sha256 do not push
    the test accuracy off the screen. Then the status, the worker.
    """

    def accuracy(outcome: Outcome) -> float:
        value = outcome.figures.get("test_accuracy")
        return value if isinstance(value, (int, float)) else -1.0

    ordered = sorted(outcomes, key=lambda o: (not o.ok, -accuracy(o), o.point.name))
    labels = short_labels([o.point for o in ordered])
    rows = []
    for outcome, label in zip(ordered, labels, strict=True):
        figures = outcome.figures
        best, epochs = figures.get("best_epoch"), figures.get("epochs")
        rows.append(
            {
                "experiment": outcome.point.name,
                "test accuracy": number(figures.get("test_accuracy")),
                "ROC AUC": number(figures.get("roc_auc")),
                "best epoch": f"{best} of {epochs}" if best and epochs else "",
                "wall time": duration(outcome.seconds),
                "overrides": label,
                "status": outcome.status + (f": {first_line(outcome.message)}" if outcome.message else ""),
                "worker": outcome.host,
                "environment": f"uv.lock {outcome.lock}" if outcome.lock else "",
            }
        )
    return rows


def short_labels(points: Sequence[Point]) -> list[str]:
    """Each point's overrides as `Point.label` gives them, every value shortened alike per key
    (convnets.compare.short_forms: as little as keeps different values different)."""
    from convnets.compare import short_forms

    split = [[override.partition("=") for override in point.overrides] for point in points]
    by_key: dict[str, list[str]] = {}
    for parts in split:
        for key, eq, value in parts:
            if eq:
                by_key.setdefault(key, []).append(value)
    shortened = {key: iter(short_forms(values)) for key, values in by_key.items()}
    return [
        " ".join(key + eq + (next(shortened[key]) if eq else "") for key, eq, _ in parts) or "(defaults)"
        for parts in split
    ]


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def text_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no experiments)"
    header = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(header, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
