"""The flows: the DVC pipeline stage by stage, and one stage run on a work pool's machine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import (
    environments,
    experiment,
    grid,
    locked,
    nightly,
    prefect_api,
    remote,
    results,
    rungs,
    sweep,
    tasks,
    workspace,
)
from pipeline.dag import read_stage_graph
from pipeline.dvc import ReproRun
from pipeline.waiting import DEFAULT_TIMEOUT_S

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
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Run the DVC pipeline one stage at a time, in the order of `dvc dag`.

    overrides: `-S` overrides as for `dvc exp run` (e.g. "train.epochs=3", "dataset=dogs_vs_cats").
    stages: run these and their upstream stages (all stages when empty); single_item: only these.
    experiment: save the run as a DVC experiment (default: when there are overrides).
    remote_stages: stage -> deployment to run it on (default: train -> dvc-stage/train-gpu),
        used when that deployment and its work pool exist; local_only: never send a stage away;
        timeout: how long a stage sent away waits for a worker to poll its pool.
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

    targets = {} if local_only else {stage: remote_target(stage, remote_stages) for stage in plan}
    outcomes: dict[str, str] = {}
    for stages in local_runs(plan, targets):
        stage, target = stages[0], targets.get(stages[0])
        if target is not None and tasks.stage_changed(project, stage):
            tasks.run_on_worker(project, stage, graph.predecessors(stage), target, timeout)
            with ReproRun(project, [stage], pull=True) as repro:
                tasks.reproduce_stage(repro, stage)
            outcomes[stage] = f"ran on {target.pool}"
        else:
            with ReproRun(project, stages) as repro:
                for stage in stages:
                    outcomes[stage] = tasks.reproduce_stage(repro, stage)

    # Both ask DVC to compare with the baseline; side by side they take the time of one.
    published = [tasks.publish_metrics.submit(project)]
    if (project / report_dir).is_dir():
        published.append(tasks.publish_report.submit(project, report_dir))
    for future in published:
        future.result()
    saved = None
    if record and any(outcome != "skipped" for outcome in outcomes.values()):
        saved = tasks.save_experiment(project, experiment_name)
        logger.info("saved as DVC experiment %s (see `dvc exp show`)", saved)
        tasks.publish_leaderboard(project)
    elif record:
        logger.info("every stage was up to date: no new experiment")
    return {"stages": outcomes, "experiment": saved}


def local_runs(plan: list[str], targets: dict[str, remote.RemoteTarget | None]) -> list[list[str]]:
    """The plan cut into runs of consecutive stages for one `dvc repro` each.

    A stage that may go to a worker (it has a target) stands alone: whether it goes is
    decided only once the stages before it have run.
    """
    runs: list[list[str]] = []
    for stage in plan:
        if targets.get(stage) is not None or not runs or targets.get(runs[-1][0]) is not None:
            runs.append([stage])
        else:
            runs[-1].append(stage)
    return runs


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
def dvc_stage(
    stage: str,
    commit: str,
    files: dict[str, str | None],
    repository: str,
    dvc_remote: str | None = None,
) -> dict:
    """Run one stage for a parent `dvc-pipeline` run, in a clean clone of `repository` at `commit`.

    files: the parent's params.yaml and dvc.lock; dvc_remote: the DVC remote both sides use.
    """
    logger = get_run_logger()
    workspace.check_trusted(repository, dvc_remote, logger.warning)
    with (
        workspace.clean_checkout(repository, commit, f"stage-{stage}") as checkout,
        environments.environment_for(checkout, on_line=logger.debug, params=[files.get("params.yaml") or ""]) as runenv,
    ):
        logger.info(runenv.summary())
        env = {**workspace.run_environment(dvc_remote), **runenv.variables(checkout)}
        experiment.configure_dvc(checkout, dvc_remote)
        remote.write_shipped_files(checkout, files)
        upstream = read_stage_graph(checkout).predecessors(stage)
        if upstream:
            tasks.pull_inputs(checkout, upstream, env)
        with ReproRun(checkout, [stage], env=env) as repro:
            outcome = tasks.reproduce_stage(repro, stage)
        tasks.push_outputs(checkout, stage, env)
        logger.info("'%s' %s at %s in a clean clone on %s", stage, outcome, commit[:7], workspace.host())
    return {"stage": stage, "outcome": outcome, "commit": commit, "host": workspace.host(), "lock": runenv.digest}


@flow(name="dvc-experiment")
def dvc_experiment(
    repository: str,
    commit: str,
    overrides: list[str],
    name: str,
    dvc_remote: str | None = None,
    data_stages: list[str] | None = None,
    data_lock: dict | None = None,
    data_artifact: str | None = None,
    replace: bool = False,
) -> dict:
    """One DVC experiment of `commit`, in a clean clone, pushed home (see pipeline.experiment).

    With data_stages, only those stages run (and go to DVC's run cache), for the sweep's
    other experiments with the same data params to restore instead of rerunning; their
    dvc.lock entries are published as the table artifact `data_artifact`. data_lock: those
    entries, handed to the group's points, so that they need not receive the data stages'
    outputs (pipeline.locked). replace: the git remote holds refs of this name whose outputs
    never reached the DVC remote; this run's replace them (pipeline.experiment.push_home).
    """
    logger = get_run_logger()
    started = time.monotonic()
    workspace.check_trusted(repository, dvc_remote, logger.warning)
    with (
        workspace.clean_checkout(repository, commit, name) as checkout,
        environments.environment_for(checkout, on_line=logger.debug, params=overrides) as runenv,
    ):
        logger.info(runenv.summary())
        env = {**workspace.run_environment(dvc_remote), **runenv.variables(checkout)}
        experiment.configure_dvc(checkout, dvc_remote)
        logger.info("%s at %s on %s: %s", name, commit[:7], workspace.host(), " ".join(overrides) or "defaults")
        if data_stages:
            entries = experiment.prepare_data(checkout, data_stages, overrides, env, logger.info)
            if data_artifact:
                create_table_artifact(
                    key=data_artifact,
                    table=[{"stage": stage, "entry": json.dumps(entry)} for stage, entry in entries.items()],
                    description=f"dvc.lock entries of the data stages that {name} ran at {commit[:7]}",
                )
            return {"name": name, "data_stages": data_stages, "worker": workspace.host(), "lock": runenv.digest}
        if data_lock:
            locked.adopt_entries(checkout, data_lock)
        reused = locked.locked_data_reused(checkout, overrides, data_stages_of(checkout))
        if reused:
            source = "the data-stage run's" if data_lock else "the commit's"
            logger.info("%s dvc.lock holds the data stages as this run needs them: --allow-missing", source)
        experiment.run_experiment(checkout, name, overrides, env, logger.info, allow_missing=reused)
        figures = experiment.read_figures(checkout)
        experiment.push_home(checkout, name, repository, env, logger.info, replace=replace)
    summary = {
        "experiment": name,
        "commit": commit,
        "overrides": " ".join(overrides),
        **figures,
        "worker": workspace.host(),
        "lock": runenv.digest[:12],
        "seconds": round(time.monotonic() - started, 1),
    }
    create_table_artifact(
        key=prefect_api.artifact_key("experiment", commit[:7], name),
        table=[summary],
        description=f"DVC experiment {name} of {commit[:7]} (`dvc exp pull origin {name}`)",
    )
    logger.info("%s pushed home: test accuracy %s", name, figures.get("test_accuracy"))
    return summary


@flow(name="dvc-sweep")
def dvc_sweep(
    set_params: list[str],
    pool: str = "gpu",
    name_prefix: str = "sweep",
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = sweep.DEFAULT_RETRIES,
    project_dir: str | None = None,
    git_remote: str = "origin",
    data_pool: str | None = None,
    halving: int = 0,
    min_epochs: int = 1,
    halving_metric: str = "val_loss",
    run_timeout: float | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Every point of the `-S` grid as one experiment on the pool; results pulled into this project.

    data_pool: where the shared data stages run (default: `cpu` when a worker polls it, else `pool`).
    run_timeout: seconds one run may stay RUNNING before it is cancelled (default: its pool's,
    pipeline.waiting.run_timeout_for); deadline: seconds from now after which the sweep cancels
    what has not ended and fails, naming those points (a rerun goes on with them).
    halving: 2 or more for successive halving by that factor (pipeline.rungs), from rungs of
    `min_epochs`, ranked by the best epoch's `halving_metric` (val_loss or val_accuracy).
    """
    logger = get_run_logger()
    bounds = sweep.Bounds(run_timeout, time.monotonic() + deadline if deadline else None)
    project = project_root(project_dir)
    points, target, groups, data_stages = sweep_plan(project, set_params, name_prefix, pool, git_remote)
    logger.info(
        "%d experiment(s) of %s on pool %r: %s", len(points), target.commit[:7], pool, ", ".join(p.name for p in points)
    )

    def run(rung_points: list[grid.Point], groups_of_rung: dict[str, list[grid.Point]]) -> list[results.Outcome]:
        return sweep.run_points(
            dvc_experiment,
            rung_points,
            target,
            groups_of_rung,
            data_stages,
            timeout,
            retries,
            logger.info,
            data_pool,
            bounds,
        )

    if halving:
        return halving_sweep(project, points, target, groups, run, (halving, min_epochs, halving_metric), git_remote)
    outcomes = run(points, groups)
    home = [o.point.name for o in outcomes if o.ok]
    if home:
        tasks.pull_experiments(project, git_remote, home)
    description = f"Sweep of {target.commit[:7]} on pool {pool} (`dvc exp show` has them)"
    rows = tasks.publish_leaderboard(project, results.point_rows(outcomes), description=description)
    if not all(o.ok for o in outcomes):
        raise results.ExperimentsFailed(outcomes, rows)
    return rows


def halving_sweep(
    project: Path,
    points: list[grid.Point],
    target: results.Target,
    groups: dict[str, list[grid.Point]],
    run,
    how: tuple[int, int, str],
    git_remote: str,
) -> list[dict]:
    """dvc_sweep with --halving: the rungs (pipeline.rungs), each rung's ranking as an artifact, the
    states of the points that are out removed from the mirror, one row per point."""
    logger = get_run_logger()
    eta, min_epochs, metric = how
    full = halving_budget(project, points)

    def run_rung(rung_points: list[grid.Point], base: dict[str, grid.Point]) -> list[results.Outcome]:
        alive = {base[point.name].name: point for point in rung_points}
        rung_groups = {key: [alive[p.name] for p in group if p.name in alive] for key, group in groups.items()}
        return run(rung_points, {key: group for key, group in rung_groups.items() if group})

    result = rungs.run_halving(points, full, eta, run_rung, logger.info, min_epochs, metric)
    for index, rows in enumerate(result.decisions):
        create_table_artifact(
            key=f"dvc-halving-rung-{index + 1}",
            table=rows,
            description=f"Rung {index + 1} of the halving sweep of {target.commit[:7]}: ranking by {metric}",
        )
    if target.dvc_remote:
        rungs.remove_states(
            workspace.resume_url_beside(target.dvc_remote), rungs.eliminated_states(result), logger.info
        )
    outcomes = result.runs
    home = [o.point.name for o in outcomes if o.ok]
    if home:
        tasks.pull_experiments(project, git_remote, home)
    rows = tasks.publish_leaderboard(project, rungs.point_rows(result), metric, result.closing_line())
    logger.info(result.closing_line())
    if not all(o.ok for o in outcomes):
        raise results.ExperimentsFailed(outcomes, rows)
    return rows


def halving_budget(project: Path, points: list[grid.Point]) -> int:
    """The epochs every point trains to (train.epochs + train.fine_tune_epochs): one budget for all."""
    budgets = set()
    for point in points:
        train_params = grid.check_point(project, point).get("train", {})
        budgets.add(int(train_params.get("epochs") or 0) + int(train_params.get("fine_tune_epochs") or 0))
    if len(budgets) != 1:
        raise grid.SweepError(f"--halving needs one budget for every point; these train for {sorted(budgets)} epochs")
    return budgets.pop()


def sweep_plan(
    project: Path, set_params: list[str], name_prefix: str, pool: str, git_remote: str
) -> tuple[list[grid.Point], results.Target, dict[str, list[grid.Point]], list[str]]:
    """The points, checked; where they run; the groups of them that share data stages, and those stages."""
    points = grid.make_points(set_params, name_prefix)
    params = {p.name: grid.check_point(project, p) for p in points}
    target = sweep_target(project, pool, git_remote)
    data_stages = data_stages_of(project)
    keys = grid.data_params(project, data_stages)
    source = grid.data_source(project, target.commit, data_stages)
    groups: dict[str, list[grid.Point]] = {}
    for point in points:
        groups.setdefault(grid.data_key(params[point.name], keys, source), []).append(point)
    return points, target, groups, data_stages


def cancel_sweep(
    set_params: list[str],
    pool: str = "gpu",
    name_prefix: str = "sweep",
    project_dir: str | None = None,
    git_remote: str = "origin",
    halving: int = 0,
    min_epochs: int = 1,
) -> list[str]:
    """`python -m pipeline sweep ... --cancel`: cancel the runs of that sweep that have not ended; their names.

    With halving, the runs of every rung (the points as pipeline.rungs names them) are cancelled too.
    """
    project = project_root(project_dir)
    points, target, groups, _ = sweep_plan(project, set_params, name_prefix, pool, git_remote)
    if halving:
        full = halving_budget(project, points)
        points = [
            rungs.rung_point(p, epochs, full) for p in points for epochs in rungs.rung_epochs(full, halving, min_epochs)
        ]
    return sweep.cancel_runs(points, target, groups)


def sweep_target(project: Path, pool: str, git_remote: str) -> results.Target:
    """The commit to run (HEAD, pushed and clean), its repository and the shared DVC remote."""
    dirty = remote.uncommitted_changes(project, composed=grid.composed_files(project))
    commit = remote.head_commit(project)
    if dirty:
        raise grid.SweepError(
            f"uncommitted changes to {', '.join(dirty)}: a sweep runs commit {commit[:7]} "
            "on the workers, so commit and push them first"
        )
    remote.check_pushed(project, commit, git_remote)
    repository = workspace.without_credentials(remote.git_remote_url(project, git_remote))
    return results.Target(repository, commit, remote.dvc_remote_url(project), pool)


def data_stages_of(project: Path, training_stage: str = "train") -> list[str]:
    """The stages upstream of training: the ones experiments on the same data share."""
    graph = read_stage_graph(project)
    upstream = graph.ancestors(training_stage) if training_stage in graph.order else set()
    return [stage for stage in graph.order if stage in upstream]


@flow(name="dvc-nightly")
def dvc_nightly(
    branch: str = "main",
    pool: str = "gpu",
    repository: str | None = None,
    dvc_remote: str | None = None,
    overrides: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = sweep.DEFAULT_RETRIES,
) -> dict:
    """The head of `branch` as one experiment on the pool, compared with the previous scheduled run's.

    repository and dvc_remote default to those of the checkout the worker's venv was installed
    from; overrides (`-S` syntax) apply to every nightly run, e.g. dataset=dogs_vs_cats. The
    previous run is that of the same branch and overrides; a run whose worker died is submitted
    again, up to `retries` times, as a sweep's points are.
    """
    logger = get_run_logger()
    repository = repository or remote.git_remote_url(remote.installed_checkout())
    dvc_remote = dvc_remote or remote.dvc_remote_url(remote.installed_checkout())
    commit = remote.branch_head(repository, branch)
    previous = nightly.previous_run(branch, overrides)
    if previous and previous.get("commit") == commit and previous.get("status") in ("done", "already done"):
        message = f"nothing changed on {branch} since the last scheduled run (commit {commit[:7]}): nothing trained"
        logger.info(message)
        create_markdown_artifact(key=nightly.artifact_key(branch, overrides, "note"), markdown=message)
        return {"commit": commit, "status": "unchanged"}
    point = grid.Point(tuple(overrides or ()), nightly.experiment_name(commit, overrides))
    nightly.check_before_submitting(point, repository, commit)
    target = results.Target(repository, commit, dvc_remote, pool)
    (outcome,) = sweep.run_points(dvc_experiment, [point], target, {}, [], timeout, retries, logger.info)
    rows = nightly.comparison_rows(outcome, commit, previous)
    create_table_artifact(
        key=nightly.artifact_key(branch, overrides),
        table=rows,
        description=f"Nightly run of {branch} at {commit[:7]} against the previous one",
    )
    if not outcome.ok:
        raise results.ExperimentsFailed([outcome])
    return {"commit": commit, "status": outcome.status, "experiment": point.name}
