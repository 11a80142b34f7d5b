"""The Prefect server as a sweep sees it: pools and their workers, the experiment deployment,
the crash automation, keyed table artifacts.

The flow a deployment runs is handed in by the caller (pipeline.flows): nothing here
imports the flows.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

from pipeline.grid import SweepError

EXPERIMENT_FLOW = "dvc-experiment"
PULL_STEPS = [{"pipeline.workspace.enter_work_folder": {}}]
CRASH_AUTOMATION = "convnets: mark silent dvc-experiment runs crashed"
HEARTBEATS_MISSED = 3  # a run is declared crashed after this many silent heartbeat periods


def check_pool(client, pool: str) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise SweepError(
            f"no work pool {pool!r} on the Prefect server: create it with "
            f"`prefect work-pool create {pool} --type process` and start workers on it"
        ) from None


def ensure_deployment(client, flow, pool: str) -> str:
    """The `dvc-experiment/<pool>` deployment of `flow` (pipeline.flows.dvc_experiment), created or updated."""
    from prefect.utilities.callables import parameter_schema

    flow_id = client.create_flow(flow)
    client.create_deployment(
        flow_id=flow_id,
        name=pool,
        work_pool_name=pool,
        entrypoint="pipeline.flows.dvc_experiment",
        pull_steps=PULL_STEPS,
        parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
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
