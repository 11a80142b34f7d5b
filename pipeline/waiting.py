"""Waiting for flow runs on a work pool: until each has ended, resubmitting crashed ones,
giving up when no worker polls the pool, riding out a restarting Prefect API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from pipeline.grid import Point, SweepError
from pipeline.prefect_api import online_workers
from pipeline.results import Outcome
from pipeline.workspace import KeepCheckout

POLL_S = 2.0
DEFAULT_TIMEOUT_S = 300.0
API_PATIENCE_S = 600.0  # how long a restarting Prefect server is waited for

FINAL_OK = "COMPLETED"
NOT_STARTED = {"SCHEDULED", "PENDING"}


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
