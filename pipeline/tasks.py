"""Prefect tasks: each one a `dvc` command (or a few), its output streamed to the run log.

No task uses Prefect's cache (cache_policy=NO_CACHE): DVC alone decides whether a stage is
up to date, so a stage DVC would rerun is never skipped by Prefect.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.tasks import exponential_backoff

from pipeline import artifacts, remote, results
from pipeline.dvc import (
    DvcTimeout,
    ReproRun,
    StageRanLocally,
    TransientStageError,
    check_dvc,
    dvc_json,
    stage_failure,
    stage_outcome,
    starts_running,
)
from pipeline.grid import Point
from pipeline.overrides import apply_overrides
from pipeline.results import Outcome
from pipeline.waiting import wait_for
from pipeline.workspace import WorkspaceError, git, without_credentials

LEADERBOARD = "dvc-leaderboard"  # the one table of experiments side by side (a sweep's too)
STAGE_RETRIES = 3
STAGE_BACKOFF_S = 5  # waits of about 5, 10, 20 s between tries
# A transfer that timed out ($CONVNETS_DVC_TIMEOUT, hours) is tried once more: a remote that hung may
# answer again, and each try is bounded, so a remote that stays silent costs two bounds, not forever.
TRANSFER_RETRIES = 1
TRANSFER_BACKOFF_S = 60


def retry_if_transient(task, task_run, state) -> bool:
    """Retry only for a held lock or a network error (a stage's, or a transfer that timed out),
    never for bad params or data."""
    return isinstance(state.data, (TransientStageError, DvcTimeout))


# The tasks that only move data to or from a remote (pull_inputs, push_outputs, pull_experiments).
TRANSFER_OPTIONS = {
    "cache_policy": NO_CACHE,
    "retries": TRANSFER_RETRIES,
    "retry_delay_seconds": TRANSFER_BACKOFF_S,
    "retry_condition_fn": retry_if_transient,
}


@task(name="apply-overrides", cache_policy=NO_CACHE)
def write_params(project: Path, overrides: list[str]) -> list[str]:
    logger = get_run_logger()
    written = apply_overrides(project, overrides)
    logger.info(
        "params written as `dvc exp run %s` would: %s",
        " ".join(f"-S {o}" for o in overrides),
        ", ".join(written) or "none",
    )
    return written


@task(
    name="stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=STAGE_RETRIES,
    retry_delay_seconds=exponential_backoff(STAGE_BACKOFF_S),
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_if_transient,
)
def reproduce_stage(repro: ReproRun, stage: str) -> str:
    """`stage`'s part of a `dvc repro --single-item`: 'ran', 'restored' or 'skipped', as DVC decided.

    With repro.pull the stage ran on a worker: DVC must restore it from the run cache,
    and starting its command here is an error, not a fallback.
    """
    logger = get_run_logger()
    try:
        run = repro.stage(stage, on_line=logger.info, stop_on=starts_running(stage) if repro.pull else None)
    except StageRanLocally:
        raise remote.RemoteStageError(
            f"DVC found no result of '{stage}' from the worker in the remote's run cache and "
            "started to run it here (stopped): check that both checkouts use the same DVC "
            "remote (`dvc remote list`) and the same code"
        ) from None
    if not run.ok:
        failure = stage_failure(stage, run)
        logger.error("%s", failure)
        raise failure
    outcome = stage_outcome(stage, run.tail)
    logger.info("stage '%s': %s", stage, outcome)
    return outcome


@task(name="stage-changed", task_run_name="status-{stage}", cache_policy=NO_CACHE)
def stage_changed(project: Path, stage: str) -> bool:
    """Whether `dvc status <stage>` reports anything (only then is it worth sending away)."""
    return bool(dvc_json(project, ["status", stage]))


@task(name="run-on-worker", task_run_name="{stage}-on-{target.pool}", cache_policy=NO_CACHE)
def run_on_worker(project: Path, stage: str, upstream: list[str], target: remote.RemoteTarget, timeout_s: float) -> str:
    """Push the stage's inputs, run it on the target's work pool and wait for it.

    If no worker polls the pool for timeout_s, the run is cancelled and the task fails.
    """
    logger = get_run_logger()
    commit = remote.check_can_send(project)
    if upstream:
        logger.info("pushing the outputs '%s' reads: %s", stage, ", ".join(upstream))
        check_dvc(project, ["push", *upstream], on_line=logger.info)
    if not target.pool_ready:
        logger.warning("no worker has polled pool '%s' lately; waiting up to %.0f s for one", target.pool, timeout_s)
    logger.info(
        "running '%s' on pool '%s' (deployment %s) at commit %s", stage, target.pool, target.deployment, commit[:7]
    )
    flow_run: FlowRun = run_deployment(
        target.deployment,
        timeout=0,
        parameters={
            "stage": stage,
            "commit": commit,
            "files": remote.shipped_files(project),
            "repository": without_credentials(remote.git_remote_url(project)),
            "dvc_remote": remote.dvc_remote_url(project),
        },
    )
    outcome = Outcome(Point((), stage), flow_run_id=flow_run.id, attempts=1)
    wait_for([outcome], target.pool, timeout_s, log=logger.info)
    if outcome.status != "done":
        raise remote.RemoteStageError(
            f"'{stage}' on pool '{target.pool}' ended {outcome.status} (flow run {flow_run.name}): {outcome.message}"
        )
    return flow_run.name


@task(name="pull-inputs", **TRANSFER_OPTIONS)
def pull_inputs(project: Path, upstream: list[str], env: dict[str, str] | None = None) -> None:
    """Worker side: the outputs of the upstream stages, as the parent's dvc.lock names them."""
    logger = get_run_logger()
    # --force: this checkout mirrors the parent; local edits to data/ are not kept.
    check_dvc(project, ["pull", "--force", *upstream], on_line=logger.info, env=env)


@task(name="push-outputs", **TRANSFER_OPTIONS)
def push_outputs(project: Path, stage: str, env: dict[str, str] | None = None) -> None:
    """Worker side: the stage's outputs and DVC's run cache, so the parent can restore the run."""
    logger = get_run_logger()
    check_dvc(project, ["push", "--run-cache", stage], on_line=logger.info, env=env)


@task(name="pull-experiments", **TRANSFER_OPTIONS)
def pull_experiments(project: Path, git_remote: str, names: list[str]) -> None:
    """`dvc exp pull --no-cache`: the experiments' refs, so they show in `dvc exp show` here.

    Their outputs stay in the DVC remote until someone asks: `dvc exp pull origin NAME && dvc exp apply NAME`
    (pipeline.results.bring_home_command).
    """
    logger = get_run_logger()
    check_dvc(project, ["exp", "pull", "--no-cache", "--force", git_remote, *names], on_line=logger.info)


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(project: Path, name: str | None) -> str:
    """`dvc exp save`: the workspace as a DVC experiment, shown by `dvc exp show`."""
    logger = get_run_logger()
    run = check_dvc(project, ["exp", "save", *(["--name", name] if name else [])], on_line=logger.info)
    saved = re.search(r"saved as: (\S+)", "\n".join(run.tail))
    return saved.group(1) if saved else (name or "")


def baseline_description(project: Path) -> str:
    """The baseline DVC compares against: the last commit on the branch."""
    try:
        return "HEAD " + git(project, "log", "-1", "--format=%h %s").stdout.strip()
    except WorkspaceError:  # no commit yet
        return "HEAD (no commit yet)"


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(project: Path) -> int:
    """A table artifact of every metric of this run next to the baseline (the last commit)."""
    logger = get_run_logger()
    diff = dvc_json(project, ["metrics", "diff", "--all"]) or {}
    rows = artifacts.metrics_rows(diff)
    if not rows:
        logger.warning("no metrics to publish (dvc metrics diff found none)")
        return 0
    create_table_artifact(
        key="dvc-metrics",
        table=rows,
        description=f"Metrics of this run against the baseline, {baseline_description(project)} (`dvc metrics diff`)",
    )
    return len(rows)


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(project: Path, report_dir: str) -> int:
    """A markdown artifact: params changed against the baseline and the report's plots."""
    params = artifacts.params_rows(dvc_json(project, ["params", "diff"]) or {})
    folder = project / report_dir
    markdown = artifacts.report_markdown(folder, baseline_description(project), params)
    create_markdown_artifact(
        key="dvc-report", markdown=markdown, description=f"Plots of {report_dir} and params against the baseline"
    )
    return len(list(folder.glob("*.png")))


@task(name="publish-leaderboard", cache_policy=NO_CACHE)
def publish_leaderboard(
    project: Path,
    points: list[results.PointRow] | None = None,
    metric: str = "val_loss",
    description: str = "Experiments side by side, best test accuracy first",
) -> list[dict[str, str]]:
    """The one leaderboard: a table artifact (`dvc-leaderboard`) and a charts artifact; its rows.

    The experiments of this commit (or the sweep's `points` that came home) as compare.html shows
    them, read from `dvc exp show` and the experiments' files (convnets.compare.board), with what
    only the sweep knows beside them (results.leaderboard); a point with no experiment keeps a row.
    `metric`: what a halving sweep's rungs ranked by. Nothing is rerun.
    """
    from convnets import compare

    logger = get_run_logger()
    show = compare.exp_show(project)
    reader = compare.PlotReader(project)  # each experiment's devices.json and plots, one DVC file system each
    names = None if points is None else shown_experiments(show, points, logger.warning)
    board = compare.board(show, names, conf_dir=project / "conf", reader=reader, metric=metric)
    rows = results.leaderboard(board.columns, board.rows, points or [])
    if rows:
        note = f" (convnets.compare). {board.note}" if board.note else " (convnets.compare)"
        create_table_artifact(key=LEADERBOARD, table=rows, description=description + note)
    if names is None or names:
        create_markdown_artifact(
            key="dvc-experiment-charts",
            markdown=compare.charts_markdown(show, repo=project, names=names, reader=reader),
            description="Validation accuracy and loss of the experiments, overlaid",
        )
    return rows


def shown_experiments(show: list, points: list[results.PointRow], warn) -> list[str]:
    """The points' experiments that `dvc exp show` lists (one it lacks is warned of, and its point shown bare)."""
    from convnets import compare

    listed = {exp.name for exp in compare.experiments_from_show(show)}
    wanted = [name for point in points for name in point.experiments]
    if missing := [name for name in wanted if name not in listed]:
        warn("`dvc exp show` does not list %s: no figures for them", ", ".join(missing))
    return [name for name in wanted if name in listed]
