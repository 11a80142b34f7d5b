"""The worker's side of a run: a clean clone at the requested commit, made and removed per run.

A worker is started once, from any folder, in a venv where the project is installed. Each
flow run it takes clones the git remote into its own folder under the work root, checks
out the commit it was asked for, points DVC at the shared remote and works there, in the
environment of that commit's uv.lock (pipeline.environments); the folder is removed
afterwards. So two runs on one machine never share a DVC workspace, a new commit (new
dependencies included) needs no one to update the worker, and nobody's own checkout is touched.

The clones are made from one bare mirror of the git remote per machine (git_mirror): the
mirror fetches what is new, the clone hard-links the mirror's object files (git's local
clone), so a run costs neither a second download nor a second copy of the history.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from convnets.layout import RESUME_URL_ENV, user_cache_dir

WORK_DIR_ENV = "CONVNETS_WORK_DIR"  # where the per-run clones go (default: the user cache)
DVC_CACHE_ENV = "CONVNETS_DVC_CACHE"  # the DVC cache the clones of one machine share
DVC_REMOTE_NAME = "convnets-run"  # the remote a run's clone pushes to (config.local only)
GIT_MIRRORS_ENV = "CONVNETS_GIT_MIRRORS"  # the bare mirrors the clones of one machine are made from
FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
TRUSTED_ENV = "CONVNETS_TRUSTED_REPOSITORIES"  # the git (and DVC) remotes a worker runs, set when it starts
SCHEME_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/]*@)?([^/]*)(.*)$")  # the last @ ends the user part
SCP_LIKE = re.compile(r"^(?:[^/]*@)?([^/:]+):(.*)$")  # git's user@host:path


class WorkspaceError(RuntimeError):
    """The run cannot get a workspace: an unknown commit, a git remote refusing."""


class UntrustedRepository(WorkspaceError):
    """The run names a repository this worker was not started to run (never retried: it fails, not crashes)."""


class KeepCheckout(WorkspaceError):
    """The run made something that exists only in its clone (e.g. an experiment git refused)."""


def work_root() -> Path:
    root = Path(os.environ.get(WORK_DIR_ENV) or user_cache_dir() / "runs").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def machine_dvc_cache() -> Path:
    """The DVC cache every run's clone on this machine uses ($CONVNETS_DVC_CACHE, else the user cache)."""
    return Path(os.environ.get(DVC_CACHE_ENV) or user_cache_dir() / "dvc-cache").expanduser()


def git_mirrors() -> Path:
    """Where this machine keeps its bare mirrors of git remotes ($CONVNETS_GIT_MIRRORS, else the user cache)."""
    return Path(os.environ.get(GIT_MIRRORS_ENV) or user_cache_dir() / "git-mirrors").expanduser()


def enter_work_folder() -> dict[str, str]:
    """Prefect pull step: start every flow run in the work root, never in somebody's checkout."""
    return {"directory": str(work_root())}


def redact(url: str) -> str:
    """A URL without the user:token@ part, for messages and logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)


def without_credentials(url: str) -> str:
    """The URL to hand to other machines: no user:token@ in http(s) URLs (each worker has its own).

    ssh URLs keep their user (git@host:...), which is a login name, not a secret.
    """
    return re.sub(r"^(https?://)[^/@\s]+@", r"\1", url)


def url_parts(url: str) -> tuple[str, str, str]:
    """(scheme, host, path) of a git URL, without its user part; ("", "", path) for a local path."""
    scheme_url = SCHEME_URL.match(url)
    if scheme_url:
        scheme, host, path = scheme_url.groups()
        return scheme.lower(), host.lower(), path
    scp_like = SCP_LIKE.match(url)
    if scp_like and not url.startswith(("/", ".")):
        host, path = scp_like.groups()
        return "ssh", host.lower(), path
    return "", "", url


def comparable(url: str) -> str:
    """`url` as the allow-list compares it: no user or token, scheme and host in lower case,
    `..` resolved, no trailing / or .git; git's user@host:path as ssh://host/path.

    Local paths (and file://) are compared as written, normalised, not resolved against a folder.
    """
    scheme, host, path = url_parts(url)
    path = posixpath.normpath("/" + path.lstrip("/") if scheme else path or ".")
    path = path.rstrip("/").removesuffix(".git")
    return f"{scheme}://{host}{path}" if scheme not in ("", "file") else path


def trusted_entries(environ: Mapping[str, str]) -> list[str]:
    """The allow-list of $CONVNETS_TRUSTED_REPOSITORIES (comma- or space-separated URLs or
    URL prefixes), comparable; [] when it is not set."""
    return [comparable(entry) for entry in re.split(r"[\s,]+", environ.get(TRUSTED_ENV, "")) if entry]


def is_trusted(url: str, entries: list[str]) -> bool:
    """`url` is an entry, or lies under one: a prefix matches whole path segments only."""
    candidate = comparable(url)
    return any(candidate == entry or candidate.startswith(entry.rstrip("/") + "/") for entry in entries)


def check_trusted(
    repository: str, dvc_remote: str | None, warn: Callable[[str], object], environ: Mapping[str, str] = os.environ
) -> None:
    """Refuse, before anything is cloned, a run whose repository (or DVC remote) is not on the
    worker's allow-list: whoever reaches the Prefect API would otherwise run any code on the
    worker, with the worker's credentials. Without an allow-list, say so once per run."""
    entries = trusted_entries(environ)
    if not entries:
        warn(f"this worker runs any repository: {TRUSTED_ENV} was not set where it was started")
        return
    for kind, url in (("repository", repository), ("DVC remote", dvc_remote)):
        if url is not None and not is_trusted(url, entries):
            raise UntrustedRepository(
                f"{kind} {redact(url)} is not on this worker's allow-list ({TRUSTED_ENV}): it runs only "
                f"{', '.join(entries)}; submit to a pool whose workers run it, or add it there and restart the worker"
            )


def refuse_options(**values: str) -> None:
    """A repository or commit that git could read as an option (`--upload-pack=...`) is no repository."""
    for what, value in values.items():
        if value.startswith("-"):
            raise WorkspaceError(f"refusing {what} {redact(value)!r}: it starts with '-'")


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    )
    if check and proc.returncode != 0:
        command = redact(" ".join(args))
        raise WorkspaceError(f"`git {command}` failed in {cwd}: {redact(proc.stderr.strip())}")
    return proc


def ls_remote(repository: str, *patterns: str) -> list[tuple[str, str]]:
    """(commit, ref) pairs the git remote itself reports, never a stale local view of it."""
    refuse_options(repository=repository)
    proc = git(Path.cwd(), "ls-remote", "--", repository, *patterns)
    return [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines() if "\t" in line]


@contextlib.contextmanager
def clean_checkout(repository: str, commit: str, label: str) -> Iterator[Path]:
    """A fresh clone of `repository` at `commit`, removed on exit unless KeepCheckout is raised.

    The clone is made from this machine's mirror of `repository` (git_mirror), then its
    `origin` is set back to `repository`, so `dvc exp push origin` and the like go to the
    real remote, as from a plain clone.
    """
    refuse_options(repository=repository, commit=commit)
    folder = Path(tempfile.mkdtemp(prefix=f"{safe_name(label)}-", dir=work_root()))
    keep = False
    try:
        with git_mirror(repository, commit) as mirror:
            git(folder.parent, "clone", "--quiet", "--no-checkout", "--local", "--", str(mirror), str(folder))
        git(folder, "remote", "set-url", "--", "origin", repository)
        # `git checkout` takes no end of options before a commit (`--` would make it a path):
        # it gets the full SHA git itself resolved, which cannot start with '-'.
        resolved = git(
            folder, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}", check=False
        )
        if resolved.returncode != 0:
            raise WorkspaceError(
                f"commit {commit[:7]} is not on {redact(repository)}: push it (git push) and submit again"
            )
        git(folder, "checkout", "--quiet", "--detach", resolved.stdout.strip(), "--")
        yield folder
    except KeepCheckout:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def git_mirror(repository: str, commit: str) -> Iterator[Path]:
    """This machine's bare mirror of `repository`, holding `commit` if the remote has it, locked while in use.

    One mirror per remote (its URL without credentials names it) under git_mirrors(). The
    remote's branches and tags are fetched into it before a clone, unless `commit` (a full
    SHA) is already there: then the remote is not even asked. The URL is given to each
    fetch and never stored, so no token stays on disk.

    Why a local clone of a mirror, and not `git clone --reference`: a local clone hard-links
    the mirror's object files, so it costs no disk and, unlike borrowing through
    `objects/info/alternates`, cannot be broken by a later gc of the mirror (a hard link keeps
    the file); `--dissociate` would copy the objects instead. git's own gc of the mirror runs in
    the foreground (gc.autoDetach false), inside the lock.

    The lock (an exclusive flock on <mirror>.lock) serialises the fetches and clones of all
    runs on the machine: two runs starting together never fetch into, or clone from, a
    half-updated mirror. A clone from the mirror takes a fraction of a second.
    """
    url = without_credentials(repository)
    tail = safe_name(url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")) or "repo"
    mirror = git_mirrors() / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.git"
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with open(mirror.with_name(mirror.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        git(mirror.parent, "init", "--quiet", "--bare", "--", str(mirror))  # a no-op once it exists
        git(mirror, "config", "gc.autoDetach", "false")
        known = bool(FULL_SHA.match(commit)) and (
            git(mirror, "cat-file", "-e", "--end-of-options", f"{commit}^{{commit}}", check=False).returncode == 0
        )
        if not known:
            # From the work root, as `git clone` ran before: a relative local path means the same.
            git(
                work_root(),
                f"--git-dir={mirror}",
                "fetch",
                "--quiet",
                "--prune",
                "--no-tags",
                "--no-write-fetch-head",  # FETCH_HEAD would keep the URL
                "--",
                repository,
                "+refs/heads/*:refs/heads/*",
                "+refs/tags/*:refs/tags/*",
            )
        yield mirror


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "run"


# --- where a run's data and training state go ------------------------------------------------


def resume_url_beside(remote_url: str) -> str:
    """The training-state mirror next to the DVC remote: <parent>/<name>-train-resume."""
    base = remote_url.rstrip("/")
    head, _, tail = base.rpartition("/")
    if not head or head.endswith(":/") or head.endswith(":"):  # a bucket root: no parent to use
        return f"{base}/convnets-train-resume"
    return f"{head}/{tail}-train-resume"


def run_environment(dvc_remote: str | None) -> dict[str, str]:
    """Variables for `dvc` in a run's clone: the mirror for the train stage's epoch state."""
    env: dict[str, str] = {}
    if dvc_remote and not os.environ.get(RESUME_URL_ENV):
        env[RESUME_URL_ENV] = resume_url_beside(dvc_remote)
    return env


def host() -> str:
    return socket.gethostname()
