"""Sending a stage to a work pool (the GPU machine) and getting its result back through DVC.

The round trip, all through DVC's remote (no shared disk, no result storage):
1. the parent pushes the outputs the stage reads (`dvc push <upstream stages>`);
2. the worker, in its own checkout at the same commit, takes the parent's params.yaml and
   dvc.lock, pulls those outputs, runs the stage and pushes its outputs and DVC's run
   cache (`dvc push --run-cache <stage>`);
3. the parent runs `dvc repro <stage> --pull`: DVC finds the worker's run in the run
   cache, pulls its outputs and writes the stage's dvc.lock entry itself, so the parent's
   `dvc status` is clean without copying lock entries around.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEPLOYMENT = "dvc-stage/train-gpu"
CHECKOUT_ENV = "CONVNETS_CHECKOUT"
# Files the parent may have changed that travel with the request; any other uncommitted
# change to a tracked file would make the worker run different code than the parent has.
SHIPPED_FILES = ("params.yaml", "dvc.lock")
IGNORED_CHANGES = ("conf/",)   # presets only feed params.yaml, which is shipped


class RemoteStageError(RuntimeError):
    """The stage cannot be sent to, or did not come back from, the work pool."""


@dataclass(frozen=True)
class RemoteTarget:
    deployment: str
    pool: str
    pool_ready: bool   # a worker has polled the pool recently


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


def uncommitted_code(project: Path) -> list[str]:
    """Tracked files changed since HEAD, other than the ones shipped with the request."""
    changed = []
    for line in git(project, "status", "--porcelain", "--untracked-files=no").splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path in SHIPPED_FILES or path.startswith(IGNORED_CHANGES) or Path(path).name == ".gitignore":
            continue
        changed.append(path)
    return changed


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
    return commit


# --- the worker's side --------------------------------------------------------------------

def check_same_commit(project: Path, commit: str) -> None:
    head = head_commit(project)
    if head != commit:
        raise RemoteStageError(
            f"the worker's checkout {project} on {socket.gethostname()} is at {head[:7]}, "
            f"the parent flow at {commit[:7]}: run `git fetch && git checkout {commit[:7]}` there"
        )


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


def package_checkout() -> Path:
    """The checkout this `pipeline` package was imported from (an editable install)."""
    return Path(__file__).resolve().parents[1]


def enter_checkout(directory: str | None = None) -> dict[str, str]:
    """Prefect pull step: run the flow in this machine's checkout of the project.

    The checkout is `directory`, else $CONVNETS_CHECKOUT, else the checkout the installed
    `pipeline` package comes from (`pip install -e .` in that checkout). It is resolved
    when the flow run starts, on the worker's machine, never at `prefect deploy` time.
    """
    root = Path(directory or os.environ.get(CHECKOUT_ENV) or package_checkout()).expanduser().resolve()
    if not (root / "dvc.yaml").is_file():
        raise RemoteStageError(
            f"{root} is not a checkout of the project (no dvc.yaml): set {CHECKOUT_ENV} "
            "to the worker's clone before `prefect worker start`"
        )
    return {"directory": str(root)}
