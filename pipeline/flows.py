"""The flows: the DVC pipeline stage by stage, and one stage run on a work pool's machine."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import flow, get_run_logger

from pipeline import remote, tasks
from pipeline.dag import read_stage_graph

REPORT_DIR = "data/report"


def project_root(project_dir: str | None) -> Path:
    """The DVC project at or above `project_dir` (default: the working directory)."""
    start = Path(project_dir or os.getcwd()).expanduser().resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise FileNotFoundError(f"no DVC project at or above {start}: run from a clone of the repo or pass --project")


@flow(name="dvc-pipeline")
def dvc_pipeline(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    single_item: bool = False,
    experiment: bool | None = None,
    experiment_name: str | None = None,
    remote_stages: dict[str, str] | None = None,
    local_only: bool = False,
    project_dir: str | None = None,
    report_dir: str = REPORT_DIR,
) -> dict:
    """Run the DVC pipeline one stage at a time, in the order of `dvc dag`.

    overrides: `-S` overrides as for `dvc exp run` (e.g. "train.epochs=3", "dataset=dogs_vs_cats").
    stages: run these and their upstream stages (all stages when empty); single_item: only these.
    experiment: save the run as a DVC experiment (default: when there are overrides).
    remote_stages: stage -> deployment to run it on (default: train -> dvc-stage/train-gpu),
        used when that deployment and its work pool exist; local_only: never send a stage away.
    """
    logger = get_run_logger()
    project = project_root(project_dir)
    overrides = list(overrides or [])
    record = bool(overrides) if experiment is None else experiment
    remote_stages = {"train": remote.DEFAULT_DEPLOYMENT} if remote_stages is None else remote_stages

    graph = read_stage_graph(project)
    plan = graph.plan(stages, single_item)
    logger.info("stages in the order of `dvc dag`: %s", " -> ".join(plan))
    if overrides or record:
        tasks.write_params(project, overrides)

    outcomes: dict[str, str] = {}
    for stage in plan:
        target = None if local_only else remote_target(stage, remote_stages)
        if target is not None and tasks.stage_changed(project, stage):
            tasks.run_on_worker(project, stage, graph.predecessors(stage), target)
            tasks.reproduce_stage(project, stage, restore_only=True)
            outcomes[stage] = f"ran on {target.pool}"
        else:
            outcomes[stage] = tasks.reproduce_stage(project, stage)

    tasks.publish_metrics(project)
    if (project / report_dir).is_dir():
        tasks.publish_report(project, report_dir)
    saved = None
    if record and any(outcome != "skipped" for outcome in outcomes.values()):
        saved = tasks.save_experiment(project, experiment_name)
        logger.info("saved as DVC experiment %s (see `dvc exp show`)", saved)
    elif record:
        logger.info("every stage was up to date: no new experiment")
    return {"stages": outcomes, "experiment": saved}


def remote_target(stage: str, remote_stages: dict[str, str]) -> remote.RemoteTarget | None:
    logger = get_run_logger()
    deployment = remote_stages.get(stage)
    if not deployment:
        return None
    target = remote.find_remote_target(deployment)
    if target is None:
        logger.info("no deployment %s with a work pool: '%s' runs here", deployment, stage)
    return target


@flow(name="dvc-stage")
def dvc_stage(stage: str, commit: str, files: dict[str, str | None]) -> dict:
    """Run one stage in this machine's checkout for a parent `dvc-pipeline` run (see pipeline.remote).

    commit: the parent's HEAD, which this checkout must be at; files: the parent's
    params.yaml and dvc.lock.
    """
    logger = get_run_logger()
    project = project_root(None)
    remote.check_same_commit(project, commit)
    remote.write_shipped_files(project, files)
    upstream = read_stage_graph(project).predecessors(stage)
    if upstream:
        tasks.pull_inputs(project, upstream)
    outcome = tasks.reproduce_stage(project, stage)
    tasks.push_outputs(project, stage)
    logger.info("'%s' %s in %s on %s", stage, outcome, project, socket.gethostname())
    return {"stage": stage, "outcome": outcome, "checkout": str(project), "host": socket.gethostname()}
