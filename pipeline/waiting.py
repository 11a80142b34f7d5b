"""Waiting for flow runs on a work pool: until each has ended, resubmitting crashed ones,
giving up when no worker polls the pool, riding out a restarting Prefect API; a run that stays
RUNNING past its bound is cancelled, and so is everything left when the sweep's deadline passes.

Why the sweep bounds a run, and not Prefect's `@flow(timeout_seconds=...)`: a deployment run on a
worker loads the flow from its entrypoint, so the bound would be one number fixed in the code,
never a pool's default or a sweep's flag; and Prefect enforces it inside the flow run's process
(an alarm signal in its main thread), which a process wedged in a system call or a lock, the very
hang to bound, answers late or not at all. The sweep's cancel goes through the API instead, as
`prefect flow-run cancel` does: the run's worker, alive as long as heartbeats keep coming (the
case no crash automation catches), stops the run's process; the sweep stops waiting at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from pipeline.grid import Point, SweepError
from pipeline.prefect_api import cancel_run, not_started, online_workers, state_of
from pipeline.results import Outcome
from pipeline.workspace import KeepCheckout

POLL_S = 2.0
DEFAULT_TIMEOUT_S = 300.0
API_PATIENCE_S = 600.0  # how long a restarting Prefect server is waited for
# How long one run may stay RUNNING, by pool, unless a sweep says (--run-timeout): the cpu pool
# runs data stages and small experiments; a GPU pool trains, for hours on the largest presets.
RUN_TIMEOUT_S = {"cpu": 6 * 3600.0}
DEFAULT_RUN_TIMEOUT_S = 24 * 3600.0
TIMED_OUT = "timed out"  # an Outcome's status: its run stayed RUNNING past the bound, and was cancelled
PAST_DEADLINE = "past deadline"  # an Outcome's status: the sweep's --deadline passed before it ended

FINAL_OK = "COMPLETED"


def wait_for(
    outcomes: list[Outcome],
    pool: str,
    timeout_s: float,
    log: Callable[[str], None],
    retries: int = 0,
    resubmit: Callable[[Point], UUID] | None = None,
    run_timeout_s: float | None = None,
    deadline: float | None = None,
) -> None:
    """Poll the flow runs until each has ended; resubmit crashed ones (up to `retries` times,
    with `resubmit`); give up when no worker polls `pool` for timeout_s.

    run_timeout_s: a run RUNNING longer than this (default: run_timeout_for(pool)), counted from
    when this wait first sees it running, is cancelled and counted as failed (TIMED_OUT).
    deadline: a time.monotonic() past which every run not ended is cancelled (PAST_DEADLINE).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    bound = run_timeout_s or run_timeout_for(pool)
    pending = {o.flow_run_id: o for o in outcomes if o.flow_run_id is not None and o.status == "pending"}
    running_since: dict[UUID, float] = {}
    no_worker_since: float | None = None
    api_down_since: float | None = None
    while pending:
        time.sleep(POLL_S)
        try:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))))
                # The pool's workers matter only while a run waits for one: while every run trains,
                # a poll is one request, not two (a server serves every sweep's polls every 2 s).
                workers = online_workers(client, pool) if any(map(not_started, runs)) else None
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
            state = state_of(run)
            if not_started(run):
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
            elif state == "RUNNING" and running_too_long(running_since, run.id, bound):
                del pending[run.id]
                stop(run, outcome, TIMED_OUT, f"still running after {bound:.0f} s (--run-timeout): cancelled")
                log(f"{outcome.point.name}: {outcome.status}: {outcome.message}")
        if deadline is not None and time.monotonic() >= deadline:
            stop_at_deadline([run for run in runs if run.id in pending], pending, log)
            return
        if waiting and workers == 0:
            no_worker_since = no_worker_since or time.monotonic()
            if time.monotonic() - no_worker_since > timeout_s:
                give_up_waiting(pending, pool, timeout_s)
                return
        else:
            no_worker_since = None


def run_timeout_for(pool: str) -> float:
    """How long a run on `pool` may stay RUNNING when the sweep names no bound of its own."""
    return RUN_TIMEOUT_S.get(pool, DEFAULT_RUN_TIMEOUT_S)


def running_too_long(running_since: dict[UUID, float], run_id: UUID, bound: float) -> bool:
    """Whether the run, RUNNING now, has been so for longer than `bound` since this wait first saw it.

    Counted here, on one clock, not from the server's start time: a submitter's clock that is off
    by minutes must not cancel a run that has just started."""
    since = running_since.setdefault(run_id, time.monotonic())
    return time.monotonic() - since > bound


def stop(run, outcome: Outcome, status: str, message: str) -> None:
    """Cancel `run` as `prefect flow-run cancel` does (prefect_api.cancel_run: a worker that has it
    stops it; one nobody took yet is Cancelled at once, or a later sweep would wait on it) and count
    it as `status`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        cancel_run(client, run, message)
    outcome.status, outcome.message = status, message


def stop_at_deadline(runs: list, pending: dict, log: Callable[[str], None]) -> None:
    """The sweep's deadline passed: cancel every run not ended, name the points, say how to resume."""
    for run in runs:
        stop(run, pending[run.id], PAST_DEADLINE, "cancelled: the sweep's --deadline passed before it ended")
    for outcome in pending.values():  # a run the API did not list: counted all the same
        if outcome.status == "pending":
            outcome.status, outcome.message = PAST_DEADLINE, "the sweep's --deadline passed before it ended"
    log(resume_line([outcome.point.name for outcome in pending.values()]))


def resume_line(names: list[str]) -> str:
    """One line for the points a deadline left: which, and how to go on with them."""
    return (
        f"the sweep's --deadline passed: {', '.join(names)} did not finish (their runs cancelled); the same "
        "command again runs them, and skips the points already home"
    )


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


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
