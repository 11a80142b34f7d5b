"""One DVC experiment in a run's clean clone: run it, push it home, read its figures.

Everything but the clone's DVC settings (configure_dvc) goes through DVC's command line:
- `dvc exp run --pull -n NAME -S ...`: `--pull` first pulls DVC's run cache from the remote,
  so stages another run already ran with the same inputs (the data stages of a sweep)
  are restored, not run again. With `--allow-missing` too when the commit's dvc.lock holds
  every data stage as the point would run it (pipeline.locked): the stages that run then
  pull only the deps they read, and a point whose first changed stage is `train` never
  receives fetch's photos;
- `dvc push --run-cache`, then `dvc exp push --no-cache origin NAME` (push_home): its outputs
  and the run cache go to the DVC remote first, and only once `dvc status --cloud` finds them
  all there do its git refs go to the git remote. `dvc exp pull origin NAME` on any other clone
  then brings it into `dvc exp show` with its outputs, and `dvc exp apply NAME` into the workspace.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from convnets.figures import TRAIN_DIR, read_json, read_run
from convnets.layout import STOPPED
from pipeline.dvc import DvcError, check_dvc, dvc_json, run_dvc, stage_failure
from pipeline.locked import stage_entries
from pipeline.workspace import DVC_REMOTE_NAME, KeepCheckout, clean_checkout, git, host, machine_dvc_cache, redact

RUNNING = re.compile(r"^Running stage '([^']+)'")
NOT_REPRODUCED = re.compile(r"^ERROR: failed to reproduce '([^']+)'")
GIT_REMOTE = "origin"  # the clone's origin is the repository the run was asked to clone
# `dvc exp push` finding another experiment of the same name in the git remote warns with this
# and exits 0, having pushed nothing.
DIVERGED = "has diverged from remote experiment"
REFS_PUSHED = ("Pushed experiment", "up to date on Git remote")  # what it says when the refs are there
NOT_HOME = ("new", "missing")  # `dvc status --cloud`: only in the local cache; nowhere

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


def push_home(
    checkout: Path,
    name: str,
    repository: str,
    env: dict[str, str],
    on_line: Callable[[str], None],
    replace: bool = False,
) -> None:
    """The experiment's outputs and DVC's run cache to the DVC remote, checked there, then its git refs.

    The refs go last because they are what says "done" to everyone else (a sweep run again,
    `dvc exp pull`). `dvc exp push` sends them first: a DVC remote that then refused (full, 403)
    left refs whose outputs nobody could pull. And `dvc push` passes over an output missing from
    the local cache without a word, hence the check. Whatever fails raises KeepCheckout: the
    clone stays, and the message says where and what to run there once the cause is fixed.

    replace: the git remote holds refs of this name whose outputs are not home (the sweep found
    them, pipeline.sweep.results_home); these replace them. Otherwise other refs of this name
    there (DVC: "diverged", which it only warns about) are a failure: another run of the point.
    """
    try:
        check_dvc(checkout, ["push", "--run-cache"], on_line=on_line, env=env)
        missing = outputs_not_on_remote(checkout, env)
    except DvcError as exc:
        raise kept(checkout, name, replace, "pushing its outputs and run cache to the DVC remote failed", exc) from None
    if missing:
        raise kept(checkout, name, replace, f"the DVC remote lacks {', '.join(missing)} after `dvc push`")
    args = ["exp", "push", "--no-cache", *(["--force"] if replace else []), GIT_REMOTE, name]
    try:
        run = check_dvc(checkout, args, on_line=on_line, env=env)
    except DvcError as exc:
        raise kept(checkout, name, replace, f"pushing its refs to {redact(repository)} failed", exc) from None
    output = "\n".join(run.tail)
    if DIVERGED in output:
        raise kept(
            checkout,
            name,
            True,
            f"{redact(repository)} already holds another experiment named {name} (DVC: diverged); "
            "its outputs are on the DVC remote, its refs are not",
        )
    if not any(said in output for said in REFS_PUSHED):
        raise kept(checkout, name, replace, f"`dvc {' '.join(args)}` did not say it pushed it", output)


def kept(checkout: Path, name: str, replace: bool, why: str, cause: Exception | str | None = None) -> KeepCheckout:
    """The failure of a push: what failed, where the experiment is kept, what to run there."""
    command = f"dvc push --run-cache && dvc exp push --no-cache{' --force' if replace else ''} {GIT_REMOTE} {name}"
    said = str(cause).strip().splitlines()[-1] if cause else ""
    return KeepCheckout(
        f"experiment {name} ran, but {why}; it is kept on {host()} in {checkout}: fix the cause, then run "
        f"`cd {checkout} && {command}` there" + (f". DVC said: {redact(said)}" if said else "")
    )


def outputs_not_on_remote(project: Path, env: dict[str, str] | None = None) -> list[str]:
    """The outputs of the checked-out dvc.lock that the DVC remote does not have (`dvc status --cloud`)."""
    status = dvc_json(project, ["status", "--cloud"], env=env) or {}
    return sorted(path for path, state in status.items() if state in NOT_HOME)


def outputs_not_home(
    repository: str, commit: str, dvc_remote: str | None, refs: dict[str, str], env: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """For each experiment of `commit` (name -> its ref in the git remote), the outputs of its
    dvc.lock that the DVC remote lacks ([]: home).

    Checked in a clean clone, so that nobody's checkout is touched: the refs are fetched into it,
    and each experiment's commit is checked out in turn (git's files only) for outputs_not_on_remote.
    """
    with clean_checkout(repository, commit, "home-check") as checkout:
        configure_dvc(checkout, dvc_remote)
        fetched = (f"+{ref}:{ref}" for ref in refs.values())
        git(checkout, "fetch", "--quiet", "--no-tags", "--", GIT_REMOTE, *fetched, remote=repository)
        missing = {}
        for name, ref in refs.items():
            git(checkout, "checkout", "--quiet", "--detach", ref, "--")  # refs/exps/...: git's own names
            missing[name] = outputs_not_on_remote(checkout, env)
    return missing


def read_figures(checkout: Path) -> dict[str, float | int | str | None]:
    """The headline figures of a finished run (convnets.figures, the one reader; blank when absent),
    and, for a run that stopped early (train.stop_at_epoch), the training state it kept."""
    stopped = read_json(checkout / TRAIN_DIR / STOPPED) or {}
    return {**read_run(checkout).headline(), "state": stopped.get("state") or ""}
