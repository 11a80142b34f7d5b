"""One DVC experiment in a run's clean clone: run it, push it home, read its figures.

Everything goes through DVC's command line in the clone:
- `dvc exp run --pull -n NAME -S ...`: `--pull` first pulls DVC's run cache from the remote,
  so stages another run already ran with the same inputs (the data stages of a sweep)
  are restored, not run again;
- `dvc exp push --run-cache origin NAME`: the experiment's git refs go to the git remote
  and its outputs plus the run cache to the DVC remote. `dvc exp pull` on any other
  clone then brings it into `dvc exp show`, and `dvc exp apply NAME && dvc pull` its outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.dvc import DvcError, check_dvc, run_dvc, stage_failure
from pipeline.workspace import DVC_REMOTE_NAME, KeepCheckout, host, machine_dvc_cache, redact

RUNNING = re.compile(r"^Running stage '([^']+)'")
GIT_REMOTE = "origin"  # the clone's origin is the repository the run was asked to clone


def configure_dvc(checkout: Path, remote_url: str | None, env: dict[str, str] | None = None) -> None:
    """The clone's DVC: the shared remote, and this machine's DVC cache (config.local: never committed).

    One cache per machine for all runs' clones: data pulled for one experiment is not pulled
    again for the next one on the same worker (DVC supports several projects on one cache).
    """
    if remote_url:
        check_dvc(checkout, ["remote", "add", "--local", "--default", "--force", DVC_REMOTE_NAME, remote_url], env=env)
    check_dvc(checkout, ["cache", "dir", "--local", str(machine_dvc_cache())], env=env)


def set_flags(overrides: Sequence[str]) -> list[str]:
    return [flag for override in overrides for flag in ("-S", override)]


def run_experiment(
    checkout: Path,
    name: str,
    overrides: Sequence[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
) -> None:
    """`dvc exp run --pull`; a failed stage raises StageFailed with that stage's own error."""
    run = run_dvc(checkout, ["exp", "run", "--pull", "-n", name, *set_flags(overrides)], on_line, env=env)
    if not run.ok:
        raise stage_failure(failed_stage(run.tail), run)


def prepare_data(
    checkout: Path,
    stages: Sequence[str],
    overrides: Sequence[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
) -> None:
    """Run (or restore) the data stages with the point's params and push them to the run cache."""
    from pipeline.overrides import apply_overrides

    apply_overrides(checkout, overrides)
    run = run_dvc(checkout, ["repro", "--pull", *stages], on_line, env=env)
    if not run.ok:
        raise stage_failure(failed_stage(run.tail), run)
    check_dvc(checkout, ["push", "--run-cache", "--with-deps", *stages], on_line=on_line, env=env)


def failed_stage(lines: Sequence[str]) -> str:
    started = [m.group(1) for line in lines if (m := RUNNING.match(line))]
    return started[-1] if started else "pipeline"


def push_home(checkout: Path, name: str, repository: str, env: dict[str, str], on_line: Callable[[str], None]) -> None:
    """Push the experiment to the git remote and its data to the DVC remote; keep it if git refuses."""
    try:
        check_dvc(checkout, ["exp", "push", "--run-cache", GIT_REMOTE, name], on_line=on_line, env=env)
    except DvcError as exc:
        raise KeepCheckout(
            f"experiment {name} ran, but pushing it to {redact(repository)} failed; it is kept on "
            f"{host()} in {checkout}: fix the access, then run `cd {checkout} && dvc exp push "
            f"--run-cache {GIT_REMOTE} {name}` there. DVC said: {redact(str(exc).splitlines()[-1])}"
        ) from None


def read_figures(checkout: Path) -> dict[str, float | int | None]:
    """The headline metrics of a finished run, from its metrics files (blank when absent)."""
    evaluation = read_json(checkout / "data/eval/metrics.json").get("test", {})
    training = read_json(checkout / "data/train/metrics.json")
    best = training.get("best", {})
    return {
        "test_accuracy": evaluation.get("accuracy"),
        "roc_auc": evaluation.get("roc_auc"),
        "best_epoch": best.get("epoch") + 1 if isinstance(best.get("epoch"), int) else None,
        "epochs": training.get("step") + 1 if isinstance(training.get("step"), int) else None,
    }


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
