"""The Prefect server as a sweep sees it: pools and their workers, the experiment deployment,
the crash automation, keyed table artifacts.

The flow a deployment runs is handed in by the caller (pipeline.flows): nothing here
imports the flows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from pipeline.grid import SweepError

EXPERIMENT_FLOW = "dvc-experiment"
LEGACY_CRASH_AUTOMATION = "convnets: mark silent dvc-experiment runs crashed"  # one for all pools, until issue 24
CRASH_AUTOMATION = "convnets: mark silent dvc-experiment runs on pool {pool} crashed"
HEARTBEATS_MISSED = 3  # a run is declared crashed after this many silent heartbeat periods
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
DEFAULT_HEARTBEAT_S = 180  # Prefect's own default
MIN_HEARTBEAT_S = 30  # Prefect's floor: it never beats more often


@dataclass(frozen=True)
class ExperimentDeployment:
    """The `dvc-experiment/<pool>` deployment, and the heartbeat period its flow runs are given."""

    name: str
    id: UUID
    pool: str
    heartbeat_s: int

    @property
    def crash_window_s(self) -> int:
        return self.heartbeat_s * HEARTBEATS_MISSED


def check_pool(client, pool: str) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise SweepError(
            f"no work pool {pool!r} on the Prefect server: create it with "
            f"`prefect work-pool create {pool} --type process` and start workers on it"
        ) from None


def ensure_deployment(client, flow, pool: str) -> ExperimentDeployment:
    """The `dvc-experiment/<pool>` deployment of `flow` (pipeline.flows.dvc_experiment), created or updated.

    Its runs get the pool's heartbeat period (pool_heartbeat_seconds) as a job variable, which
    wins over whatever the worker's own environment says: the crash automation's window is
    then derived from what the runs really do, not from the settings of whoever submits.
    """
    from prefect.utilities.callables import parameter_schema

    heartbeat_s = pool_heartbeat_seconds(client.read_work_pool(pool))
    flow_id = client.create_flow(flow)
    deployment_id = client.create_deployment(
        flow_id=flow_id,
        name=pool,
        work_pool_name=pool,
        entrypoint="pipeline.flows.dvc_experiment",
        pull_steps=pull_steps(),
        parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
        job_variables={"env": {HEARTBEAT_ENV: str(heartbeat_s)}},
        description="One DVC experiment in a clean clone at the requested commit (python -m pipeline sweep).",
    )
    return ExperimentDeployment(f"{EXPERIMENT_FLOW}/{pool}", deployment_id, pool, heartbeat_s)


def pull_steps() -> list[dict]:
    """prefect.yaml's pull steps: a sweep's own deployment starts its runs as `prefect deploy`'s do."""
    import yaml

    from pipeline.remote import installed_checkout

    config = yaml.safe_load((installed_checkout() / "prefect.yaml").read_text(encoding="utf-8"))
    return config["pull"]


def pool_heartbeat_seconds(pool) -> int:
    """The heartbeat period the pool gives its flow runs: PREFECT_FLOWS_HEARTBEAT_FREQUENCY among the
    default `env` of its base job template (`prefect work-pool update --base-job-template`), else Prefect's."""
    properties = (pool.base_job_template or {}).get("variables", {}).get("properties", {})
    value = ((properties.get("env") or {}).get("default") or {}).get(HEARTBEAT_ENV)
    if value in (None, ""):
        return DEFAULT_HEARTBEAT_S
    try:
        return max(int(value), MIN_HEARTBEAT_S)
    except (TypeError, ValueError):
        raise SweepError(f"work pool {pool.name!r}: {HEARTBEAT_ENV} is {value!r}, not a number of seconds") from None


def ensure_crash_detection(deployment: ExperimentDeployment) -> None:
    """The automation Prefect documents for zombie flow runs, for the runs of this deployment only,
    with a window of HEARTBEATS_MISSED heartbeats of its pool; replaced when the window changed.

    The one automation for all pools that earlier versions made (with the window of the first
    submitter's own setting) is removed: it would declare crashed a run of a slower heartbeat.
    """
    from prefect.automations import Automation

    description = (
        f"A {EXPERIMENT_FLOW} run of deployment {deployment.id} (pool {deployment.pool}) whose heartbeats, "
        f"every {deployment.heartbeat_s} s, stopped for {deployment.crash_window_s} s (worker killed or preempted)."
    )
    name = CRASH_AUTOMATION.format(pool=deployment.pool)
    delete_automation(LEGACY_CRASH_AUTOMATION)
    existing = read_automation(name)
    if existing is not None and existing.description == description:
        return
    if existing is not None:
        existing.delete()
    Automation(
        name=name,
        description=description,
        trigger=crash_trigger(deployment),
        actions=[crash_action(deployment.crash_window_s)],
    ).create()


def crash_trigger(deployment: ExperimentDeployment):
    """Proactive: a run of the deployment that sent a heartbeat and then nothing for the window."""
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return EventTrigger(
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
            {"prefect.resource.role": "deployment", "prefect.resource.id": f"prefect.deployment.{deployment.id}"}
        ),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=deployment.crash_window_s),
    )


def crash_action(window_s: int):
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    return ChangeFlowRunState(
        state=StateType.CRASHED,
        message=f"no heartbeat for {window_s} s: its worker stopped (killed, preempted or lost)",
    )


def read_automation(name: str):
    from prefect.automations import Automation

    try:
        return Automation.read(name=name)
    except ValueError:  # Prefect's answer for "no automation of that name"
        return None


def delete_automation(name: str) -> None:
    found = read_automation(name)
    if found is not None:
        found.delete()


def online_workers(client, pool: str) -> int:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    workers = client.read_workers_for_work_pool(
        pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    )
    return len(workers)


LIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")  # a flow run that has not ended
NOT_STARTED = ("SCHEDULED", "PENDING")


def runs_tagged(client, tags: Sequence[str], live_only: bool = False) -> list:
    """The flow runs that carry any of `tags` (live_only: those that have not ended)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )

    if not tags:
        return []
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(LIVE_STATES))) if live_only else None
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(any_=list(tags)), state=state))


def state_of(flow_run) -> str:
    """The flow run's state type ("RUNNING", ...); a run the API lists with no state yet is SCHEDULED."""
    return flow_run.state.type.value if flow_run.state else "SCHEDULED"


def not_started(flow_run) -> bool:
    """Whether the flow run still waits for a worker to take it."""
    return state_of(flow_run) in NOT_STARTED


def cancel_run(client, flow_run, message: str = "cancelled by python -m pipeline sweep --cancel") -> None:
    """As `prefect flow-run cancel` does: Cancelling, so that its worker stops the run's process;
    a run that no worker has taken yet is Cancelled at once, since nobody would act on Cancelling."""
    from prefect.states import Cancelled, Cancelling

    if not_started(flow_run):
        client.set_flow_run_state(flow_run.id, Cancelled(message=message), force=True)
    else:
        client.set_flow_run_state(flow_run.id, Cancelling(message=message))


def latest_table(key: str) -> list[dict]:
    """The rows of the newest version of a keyed table artifact ([] if there is none)."""
    from prefect.artifacts import Artifact

    found = Artifact.get(key)
    data = found.data if found else None
    return (json.loads(data) if isinstance(data, str) else data) or []


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
