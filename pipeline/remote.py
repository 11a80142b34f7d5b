"""Sending a stage to a work pool (the GPU machine) and getting its result back through DVC.

The round trip, all through DVC's remote (no shared disk, no result storage):
1. the parent pushes the outputs the stage reads (`dvc push <upstream stages>`);
2. the worker clones the parent's commit from the git remote into a folder of its own
   (pipeline.workspace), takes the parent's params.yaml and dvc.lock, pulls those
   outputs, runs the stage, pushes its outputs and DVC's run cache (`dvc push
   --run-cache <stage>`) and removes the clone;
3. the parent runs `dvc repro <stage> --pull`: DVC finds the worker's run in the run
   cache, pulls its outputs and writes the stage's dvc.lock entry itself, so the parent's
   `dvc status` is clean without copying lock entries around.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEPLOYMENT = "dvc-stage/train-gpu"
# Files the parent may have changed that travel with the request; any other uncommitted
# change to a tracked file would make the worker run different code than the parent has.
SHIPPED_FILES = ("params.yaml", "dvc.lock")
IGNORED_CHANGES = ("conf/",)  # presets only feed params.yaml, which is shipped


class RemoteStageError(RuntimeError):
    """The stage cannot be sent to, or did not come back from, the work pool."""


@dataclass(frozen=True)
class RemoteTarget:
    deployment: str
    pool: str
    pool_ready: bool  # a worker has polled the pool recently


def find_remote_target(deployment: str) -> RemoteTarget | None:
    """The deployment and its work pool if both exist on the Prefect API; None otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return None
        if not found.work_pool_name:
            return None
        try:
            pool = client.read_work_pool(found.work_pool_name)
        except ObjectNotFound:
            return None
    return RemoteTarget(deployment, pool.name, pool.status == WorkPoolStatus.READY)


# --- git state, on both sides ------------------------------------------------------------


def git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RemoteStageError(f"`git {' '.join(args)}` failed in {project}: {proc.stderr.strip()}")
    return proc.stdout


def head_commit(project: Path) -> str:
    return git(project, "rev-parse", "HEAD").strip()


def changed_files(project: Path) -> list[str]:
    """Tracked files changed since HEAD."""
    lines = git(project, "status", "--porcelain", "--untracked-files=no").splitlines()
    return [line[3:].split(" -> ")[-1].strip('"') for line in lines]


def uncommitted_code(project: Path) -> list[str]:
    """Tracked files changed since HEAD, other than the ones shipped with the request."""
    return [
        path
        for path in changed_files(project)
        if path not in SHIPPED_FILES and not path.startswith(IGNORED_CHANGES) and Path(path).name != ".gitignore"
    ]


def shipped_files(project: Path) -> dict[str, str | None]:
    """params.yaml and dvc.lock as the parent has them now (None: the file does not exist)."""
    return {
        name: (project / name).read_text(encoding="utf-8") if (project / name).exists() else None
        for name in SHIPPED_FILES
    }


def check_can_send(project: Path) -> str:
    """The commit the worker must be at; RemoteStageError if uncommitted code would differ."""
    dirty = uncommitted_code(project)
    commit = head_commit(project)
    if dirty:
        raise RemoteStageError(
            f"uncommitted changes to {', '.join(dirty)}: the worker runs commit {commit[:7]}, "
            "so commit (and push) them first, or run the stage here with --local"
        )
    check_pushed(project, commit)
    return commit


# --- the worker's side --------------------------------------------------------------------


def write_shipped_files(project: Path, files: dict[str, str | None]) -> None:
    """Take the parent's params.yaml and dvc.lock (atomically, one file at a time)."""
    for name, text in files.items():
        if name not in SHIPPED_FILES:
            raise RemoteStageError(f"refusing to write {name!r}: only {', '.join(SHIPPED_FILES)} are shipped")
        target = project / name
        if text is None:
            target.unlink(missing_ok=True)
            continue
        temp = target.with_name(f".{name}.incoming")
        temp.write_text(text, encoding="utf-8")
        temp.replace(target)


# --- what a worker needs to find the submitter's commit and data ----------------------------


def git_remote_url(project: Path, remote: str = "origin") -> str:
    try:
        return git(project, "remote", "get-url", "--", remote).strip()
    except RemoteStageError:
        raise RemoteStageError(
            f"no git remote {remote!r} in {project}: workers clone the commit from it, so add one "
            f"(`git remote add {remote} URL`) and push, or run here with --local"
        ) from None


def check_pushed(project: Path, commit: str, remote: str = "origin") -> None:
    """The commit must be on the git remote, or no worker can check it out."""
    branches = git(project, "branch", "-r", f"--contains={commit}").split()
    if not any(b.startswith(f"{remote}/") for b in branches):
        raise RemoteStageError(
            f"commit {commit[:7]} is not on {remote!r}: workers check out the commit from there, "
            "so push it first (`git push`)"
        )


def dvc_remote_url(project: Path) -> str | None:
    """The URL of the project's default DVC remote, as this machine resolves it (None: no remote)."""
    from dvc.repo import Repo

    with Repo(os.fspath(project)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        return repo.config["remote"][name]["url"]


def uncommitted_changes(project: Path, composed: tuple[str, ...] = ()) -> list[str]:
    """Tracked files changed since HEAD that a sweep would silently leave behind on the workers.

    dvc.lock is rewritten by every run, and the `composed` files (params.yaml with Hydra on:
    each point rebuilds it from conf/, as after a `dvc exp run`) do not carry over either.
    """
    return [path for path in changed_files(project) if path != "dvc.lock" and path not in composed]


def installed_checkout() -> Path:
    """The checkout this `pipeline` package was installed from (`pip install -e .` / `make install`)."""
    return Path(__file__).resolve().parents[1]


def branch_head(repository: str, branch: str) -> str:
    """The commit at the head of `branch` in the git remote, asked of the remote itself."""
    from pipeline.workspace import WorkspaceError, ls_remote, redact

    try:
        found = [sha for sha, ref in ls_remote(repository, f"refs/heads/{branch}") if ref == f"refs/heads/{branch}"]
    except WorkspaceError as exc:
        raise RemoteStageError(f"cannot read branch {branch!r} of {redact(repository)}: {exc}") from None
    if not found:
        raise RemoteStageError(f"no branch {branch!r} in {redact(repository)}")
    return found[0]
