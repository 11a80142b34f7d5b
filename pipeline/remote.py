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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from convnets import outputs
from pipeline.workspace import WorkspaceError, git, ls_remote, redact

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


# git goes through pipeline.workspace.git, the one wrapper: bounded, never prompting, and with a
# one-line failure naming a remote that does not answer.


def head_commit(project: Path) -> str:
    return git(project, "rev-parse", "HEAD").stdout.strip()


def changed_files(project: Path) -> list[str]:
    """Tracked files changed since HEAD."""
    lines = git(project, "status", "--porcelain", "--untracked-files=no").stdout.splitlines()
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
        outputs.write_text(target, text)


# --- what a worker needs to find the submitter's commit and data ----------------------------


def git_remote_url(project: Path, remote: str = "origin") -> str:
    try:
        return git(project, "remote", "get-url", "--", remote).stdout.strip()
    except WorkspaceError:
        raise RemoteStageError(
            f"no git remote {remote!r} in {project}: workers clone the commit from it, so add one "
            f"(`git remote add {remote} URL`) and push, or run here with --local"
        ) from None


def check_pushed(project: Path, commit: str, remote: str = "origin") -> None:
    """The commit must be on the git remote, or no worker can check it out.

    Asked of the remote itself (its branches and tags, `git ls-remote`), never of the local
    remote-tracking refs, which may be stale both ways: a commit pushed from another clone would be
    refused, and one whose branch was deleted on the remote would pass. A commit that is no tip
    must be an ancestor of one: the tips this clone lacks are fetched first (objects only, no ref
    of this clone moves). Both bounded (pipeline.workspace.git).
    """
    try:
        url = git_remote_url(project, remote)
    except RemoteStageError:
        raise RemoteStageError(
            f"commit {commit[:7]} is not on {remote!r}: this clone has no git remote {remote!r}, and workers "
            f"check out the commit from there, so add it (`git remote add {remote} URL`) and push (`git push`)"
        ) from None
    try:
        tips = ls_remote(remote, "refs/heads/*", "refs/tags/*", cwd=project, url=url)
        if commit not in {sha for sha, _ in tips} and not reachable(project, remote, url, commit, tips):
            raise RemoteStageError(
                f"commit {commit[:7]} is not on {remote!r}: workers check out the commit from there, "
                "so push it first (`git push`)"
            )
    except WorkspaceError as exc:
        raise RemoteStageError(f"cannot tell whether commit {commit[:7]} is on {remote!r}: {exc}") from None


def reachable(project: Path, remote: str, url: str, commit: str, tips: list[tuple[str, str]]) -> bool:
    """Whether `commit` is an ancestor of one of the remote's `tips` (fetched first where missing here)."""
    fetch_missing(project, remote, url, tips)
    shas = sorted({sha for sha, _ in tips})
    # Nothing listed: every commit reachable from `commit` is reachable from a tip. --ignore-missing
    # passes over a tip that moved on the remote between the listing and the fetch.
    proc = git(project, "rev-list", "--max-count=1", commit, "--not", "--ignore-missing", *shas)
    return proc.stdout.strip() == ""


def fetch_missing(project: Path, remote: str, url: str, tips: list[tuple[str, str]]) -> None:
    """Fetch the remote's refs whose commits this clone lacks, into no ref: --refmap= keeps git
    from moving the remote-tracking refs, --no-write-fetch-head from writing FETCH_HEAD."""
    missing = set(missing_objects(project, (sha for sha, _ in tips)))
    refs = sorted({ref.removesuffix("^{}") for sha, ref in tips if sha in missing})
    if refs:
        git(
            project,
            *("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--refmap=", "--", remote, *refs),
            remote=url,
        )


def missing_objects(project: Path, shas: Iterable[str]) -> list[str]:
    """Of `shas`, those this clone does not have (one `git cat-file --batch-check` for all)."""
    proc = git(project, "cat-file", "--batch-check", stdin="".join(f"{sha}\n" for sha in shas))
    return [line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" missing")]


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
    try:
        found = [sha for sha, ref in ls_remote(repository, f"refs/heads/{branch}") if ref == f"refs/heads/{branch}"]
    except WorkspaceError as exc:
        raise RemoteStageError(f"cannot read branch {branch!r} of {redact(repository)}: {exc}") from None
    if not found:
        raise RemoteStageError(f"no branch {branch!r} in {redact(repository)}")
    return found[0]
