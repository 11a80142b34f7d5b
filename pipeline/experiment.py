"""One DVC experiment in a run's clean clone: run it, push it home, read its figures.

Everything but the clone's DVC settings (configure_dvc) goes through DVC's command line:
- `dvc exp run --pull -n NAME -S ...`: `--pull` first pulls DVC's run cache from the remote,
  so stages another run already ran with the same inputs (the data stages of a sweep)
  are restored, not run again. With `--allow-missing` too when the commit's dvc.lock holds
  every data stage as the point would run it (pipeline.locked): the stages that run then
  pull only the deps they read, and a point whose first changed stage is `train` never
  receives fetch's photos;
- `dvc exp push --run-cache origin NAME`: the experiment's git refs go to the git remote
  and its outputs plus the run cache to the DVC remote. `dvc exp pull` on any other
  clone then brings it into `dvc exp show`, and `dvc exp apply NAME && dvc pull` its outputs.
"""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.dvc import DvcError, check_dvc, run_dvc, stage_failure
from pipeline.locked import stage_entries
from pipeline.workspace import DVC_REMOTE_NAME, KeepCheckout, host, machine_dvc_cache, redact

RUNNING = re.compile(r"^Running stage '([^']+)'")
NOT_REPRODUCED = re.compile(r"^ERROR: failed to reproduce '([^']+)'")
GIT_REMOTE = "origin"  # the clone's origin is the repository the run was asked to clone

# How the clones check out the machine's DVC cache, in DVC's order of preference. A copy-on-write
# clone where the file system has them (btrfs, XFS, APFS); else a hard link (same file system:
# free, and the workspace file outlives a cache file removed later); else a symbolic link; a
# copy only as the last resort. Links are safe here although a link in the workspace *is* the
# cache file: DVC makes linked files read-only, removes a stage's outputs before running it
# (never writing into them), and this project's stages build each output in a temporary
# sibling and rename it into place (convnets.outputs); no stage writes into its deps, and
# none has a `persist` output. Hard links come before symbolic ones: both share the data, but
# DVC makes hard links faster (`dvc checkout` of 5,000 MNIST files, DVC's start included:
# 1.8 to 2.1 s; symbolic links 5.0 to 5.2 s; copies 4.1 to 9.2 s).
LINK_TYPES = "reflink,hardlink,symlink,copy"


def configure_dvc(checkout: Path, remote_url: str | None) -> None:
    """The clone's DVC: the shared remote, this machine's DVC cache and how to link it (config.local).

    One cache per machine for all runs' clones: data pulled for one experiment is not pulled
    again for the next one on the same worker (DVC supports several projects on one cache),
    and checked out as links (LINK_TYPES), so a second clone costs no second copy. DVC's
    per-repository state (file hashes, link records), which it keeps in a site cache folder
    named by the clone's path (/var/tmp/dvc/repo/...), goes into the clone instead, so it is
    removed with the clone rather than piling up one folder per run.

    The settings are written into `.dvc/config.local` (the format `dvc config --local`
    writes, documented by DVC) rather than by three `dvc config` commands of about 1 s each.
    """
    path = checkout / ".dvc" / "config.local"
    config = configparser.ConfigParser(interpolation=None)
    config.read(path, encoding="utf-8")
    sections = {
        "core": {"site_cache_dir": str(checkout.resolve() / ".dvc" / "tmp" / "site-cache")},
        "cache": {"dir": str(machine_dvc_cache()), "type": LINK_TYPES},
    }
    if remote_url:
        sections["core"]["remote"] = DVC_REMOTE_NAME
        sections[f'remote "{DVC_REMOTE_NAME}"'] = {"url": remote_url}
    for section, values in sections.items():
        if not config.has_section(section):
            config.add_section(section)
        config[section].update(values)
    with path.open("w", encoding="utf-8") as handle:
        config.write(handle)


def set_flags(overrides: Sequence[str]) -> list[str]:
    return [flag for override in overrides for flag in ("-S", override)]


def run_experiment(
    checkout: Path,
    name: str,
    overrides: Sequence[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
    allow_missing: bool = False,
) -> None:
    """`dvc exp run --pull [--allow-missing]`; a failed stage raises StageFailed with its own error.

    allow_missing only where pipeline.locked says no data stage will run (its docstring says
    why). If DVC then gives up on a stage without running its command, it found data missing
    that the commit's dvc.lock promises (committed without `dvc push`): the run is repeated
    with `--pull` alone, which runs what it cannot pull.
    """
    flags = set_flags(overrides)
    if not allow_missing:
        run = run_dvc(checkout, ["exp", "run", "--pull", "-n", name, *flags], on_line, env=env)
        if not run.ok:
            raise stage_failure(failed_stage(run.tail), run)
        return
    started: set[str] = set()  # from the whole output: a stage's own output may outrun the tail kept

    def watch(line: str) -> None:
        if match := RUNNING.match(line):
            started.add(match.group(1))
        on_line(line)

    run = run_dvc(checkout, ["exp", "run", "--pull", "--allow-missing", "-n", name, *flags], watch, env=env)
    if not run.ok and (stage := missing_data_stage(run.tail, started)):
        on_line(f"'{stage}' has data missing on the DVC remote: running the experiment again with --pull alone")
        run = run_dvc(checkout, ["exp", "run", "--pull", "-n", name, *flags], on_line, env=env)
    if not run.ok:
        raise stage_failure(failed_stage(run.tail), run)


def missing_data_stage(lines: Sequence[str], started: set[str]) -> str | None:
    """The stage DVC failed to reproduce without starting its command (its data was missing), if any."""
    failed = [m.group(1) for line in lines if (m := NOT_REPRODUCED.match(line))]
    return failed[-1] if failed and failed[-1] not in started else None


def prepare_data(
    checkout: Path,
    stages: Sequence[str],
    overrides: Sequence[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
) -> dict[str, dict]:
    """Run (or restore) the data stages with the point's params and push them to the run cache
    and the remote; return their dvc.lock entries, for the points that share them."""
    from pipeline.overrides import apply_overrides

    apply_overrides(checkout, overrides)
    run = run_dvc(checkout, ["repro", "--pull", *stages], on_line, env=env)
    if not run.ok:
        raise stage_failure(failed_stage(run.tail), run)
    check_dvc(checkout, ["push", "--run-cache", "--with-deps", *stages], on_line=on_line, env=env)
    return stage_entries(checkout, stages)


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
