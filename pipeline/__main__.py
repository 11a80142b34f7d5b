"""`python -m pipeline` / `convnets-pipeline`: run the DVC pipeline as a Prefect flow.

With no PREFECT_API_URL set, Prefect starts its ephemeral API for the run: nothing to
install or start beforehand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Like `analytics = false` in .dvc/config; it also spares the ephemeral server's SQLite a
# telemetry write that races its first migrations ("database is locked" in the log).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Run the DVC pipeline one stage at a time as a Prefect flow (see docs/orchestration.md).",
        epilog="`python -m pipeline sweep --help`: a -S grid as DVC experiments on a Prefect work pool; "
        "`python -m pipeline clean --help`: what a worker's disk no longer needs.",
    )
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="override as for `dvc exp run -S`, e.g. train.epochs=3 or dataset=dogs_vs_cats (repeatable)",
    )
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=[],
        metavar="STAGE",
        help="run this stage and its upstream stages (repeatable; default: all)",
    )
    parser.add_argument("--single-item", action="store_true", help="run only the --stage stages, not their upstream")
    exp = parser.add_mutually_exclusive_group()
    exp.add_argument(
        "--experiment",
        dest="experiment",
        action="store_const",
        const=True,
        default=None,
        help="save the run as a DVC experiment (the default when -S is given)",
    )
    exp.add_argument(
        "--no-experiment",
        dest="experiment",
        action="store_const",
        const=False,
        help="do not save a DVC experiment, even with -S",
    )
    parser.add_argument("-n", "--name", help="name of the DVC experiment")
    parser.add_argument("--local", action="store_true", help="run every stage here, even with a gpu work pool")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up on a stage sent to a work pool no worker polls for this long (default: %(default)s)",
    )
    parser.add_argument("--project", help="the DVC project (default: the one containing the working directory)")
    parser.add_argument("--list", action="store_true", help="print the stages in run order and exit")
    return parser.parse_args(argv)


def parse_sweep_args(argv: Sequence[str]) -> argparse.Namespace:
    from pipeline.sweep import DATA_POOL, DEFAULT_RETRIES
    from pipeline.waiting import DEFAULT_TIMEOUT_S

    parser = argparse.ArgumentParser(
        prog="python -m pipeline sweep",
        description="Run every point of a -S grid as its own DVC experiment of HEAD on a Prefect work pool, "
        "then pull the experiments into this project's `dvc exp show` (see docs/orchestration.md).",
    )
    parser.add_argument(
        "-S",
        "--set-param",
        dest="set_params",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="as for `dvc exp run -S`; comma-separated values make a grid, e.g. seed=1,2,3 "
        "or +experiment=scratch,augmented (repeatable)",
    )
    parser.add_argument(
        "--pool", default="gpu", help="work pool whose workers run the experiments (default: %(default)s)"
    )
    parser.add_argument(
        "--data-pool",
        help=f"work pool for the shared data stages (default: {DATA_POOL} when a worker polls it, else --pool)",
    )
    parser.add_argument(
        "--name-prefix", default="sweep", help="experiment names start with this (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="give up when no worker polls the pool for this long (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="resubmissions of an experiment whose worker died (default: %(default)s)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        metavar="SECONDS",
        help="cancel, and count as failed, a run that stays RUNNING this long (default: its pool's, "
        "6 h on cpu, 24 h elsewhere)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="stop after this long: cancel what has not ended, name those points and exit 1 "
        "(the same command again goes on with them)",
    )
    parser.add_argument(
        "--git-remote", default="origin", help="git remote the workers clone from (default: %(default)s)"
    )
    parser.add_argument("--project", help="the DVC project (default: the one containing the working directory)")
    parser.add_argument(
        "--halving",
        type=int,
        default=0,
        metavar="FACTOR",
        help="successive halving: every point to the first rung, then the best 1/FACTOR on to the next, "
        "each continuing from its own checkpoint (docs/orchestration.md, Successive halving)",
    )
    parser.add_argument(
        "--min-epochs", type=int, default=1, help="with --halving: the first rung's epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--halving-metric",
        default="val_loss",
        choices=("val_loss", "val_accuracy"),
        help="with --halving: the best epoch's validation figure that ranks the points (default: %(default)s)",
    )
    parser.add_argument(
        "--cancel",
        action="store_true",
        help="cancel the flow runs of this sweep (same -S and --name-prefix) that have not ended, and exit",
    )
    return parser.parse_args(argv)


def secrets_refused(overrides: Sequence[str] | None) -> bool:
    """Print the one-line refusal of an override with a credential or an interpolation in it:
    checked here, before a flow is called, since a flow's parameters go to the Prefect API."""
    from pipeline.overrides import OverridesError, refuse_secrets

    try:
        refuse_secrets(list(overrides or []))
    except OverridesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return True
    return False


def sweep_main(argv: Sequence[str]) -> int:
    args = parse_sweep_args(argv)
    if secrets_refused(args.set_params):
        return 2
    if args.cancel:
        return cancel_main(args)
    from pipeline.flows import dvc_sweep
    from pipeline.results import ExperimentsFailed, bring_home_command, text_table
    from pipeline.rungs import closing_line_of
    from pipeline.sweep import SweepInterrupted

    state = dvc_sweep(
        set_params=args.set_params,
        pool=args.pool,
        name_prefix=args.name_prefix,
        timeout=args.timeout,
        retries=args.retries,
        project_dir=args.project,
        git_remote=args.git_remote,
        data_pool=args.data_pool,
        halving=args.halving,
        min_epochs=args.min_epochs,
        halving_metric=args.halving_metric,
        **bound_options(args),
        return_state=True,
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, SweepInterrupted):
        print(result, file=sys.stderr)
        return 130  # as for SIGINT
    rows = result.rows if isinstance(result, ExperimentsFailed) else result
    if isinstance(rows, list):
        print(text_table(rows))
        if closing := closing_line_of(rows):
            print(closing)
        if command := bring_home_command(rows, args.git_remote):
            print("the experiments are in `dvc exp show`; to bring the best one's outputs and metrics here, run:")
            print(command)
    if isinstance(result, BaseException):
        print(f"error: {result}", file=sys.stderr)
        if isinstance(rows, list) and (left := past_deadline(rows)):
            print(left, file=sys.stderr)
        return 1 if isinstance(result, ExperimentsFailed) else 2
    return 0


def bound_options(args: argparse.Namespace) -> dict[str, float]:
    """--run-timeout and --deadline for dvc_sweep, only those given (the flow's defaults otherwise)."""
    given = {"run_timeout": args.run_timeout, "deadline": args.deadline}
    return {name: value for name, value in given.items() if value is not None}


def past_deadline(rows: list[dict]) -> str | None:
    """The closing line for the points the sweep's --deadline left unfinished (None: none)."""
    from pipeline.waiting import PAST_DEADLINE, resume_line

    left = [row["experiment"] for row in rows if str(row.get("status", "")).startswith(PAST_DEADLINE)]
    return resume_line(left) if left else None


def cancel_main(args: argparse.Namespace) -> int:
    """`python -m pipeline sweep ... --cancel`: no flow run of its own, only the API calls."""
    from pipeline.flows import cancel_sweep

    try:
        cancelled = cancel_sweep(
            args.set_params, args.pool, args.name_prefix, args.project, args.git_remote, args.halving, args.min_epochs
        )
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"cancelled {len(cancelled)} flow run(s): {', '.join(cancelled)}" if cancelled else "nothing in flight")
    return 0


def parse_clean_args(argv: Sequence[str]) -> argparse.Namespace:
    from pipeline.clean import DEFAULT_OLDER_THAN_DAYS, default_resume_url

    parser = argparse.ArgumentParser(
        prog="python -m pipeline clean",
        description="Remove what a worker's disk no longer needs: clones of dead runs, old resume states, "
        "environments beyond the kept ones (see docs/orchestration.md, What grows on a worker).",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    parser.add_argument(
        "--older-than",
        type=float,
        default=DEFAULT_OLDER_THAN_DAYS,
        metavar="DAYS",
        help="resume states, and clones holding an experiment, untouched this long go (default: %(default)s)",
    )
    parser.add_argument(
        "--resume-url",
        default=default_resume_url(),
        metavar="URL",
        help="also clean the resume mirror at URL, e.g. <DVC remote>-train-resume (default: $CONVNETS_RESUME_URL)",
    )
    return parser.parse_args(argv)


def clean_main(argv: Sequence[str]) -> int:
    from pipeline.clean import run

    args = parse_clean_args(argv)
    return run(args.older_than, args.resume_url, args.dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["clean"]:
        return clean_main(argv[1:])
    args = parse_args(argv)
    if args.list:
        from pipeline.dag import read_stage_graph
        from pipeline.flows import project_root

        graph = read_stage_graph(project_root(args.project))
        print("\n".join(graph.plan(args.stages, args.single_item)))
        return 0

    if secrets_refused(args.overrides):
        return 2
    from pipeline.flows import dvc_pipeline

    try:
        result = dvc_pipeline(
            overrides=args.overrides,
            stages=args.stages,
            single_item=args.single_item,
            experiment=args.experiment,
            experiment_name=args.name,
            local_only=args.local,
            project_dir=args.project,
            timeout=args.timeout,
        )
    except Exception as exc:  # the flow run's log has the details; the user gets the cause
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for stage, outcome in result["stages"].items():
        print(f"{stage}: {outcome}")
    if result["experiment"]:
        print(f"experiment: {result['experiment']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
