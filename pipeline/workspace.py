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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
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
# The bounds on a worker's waits (docs/orchestration.md, "Every wait bounded"), set where it starts:
GIT_TIMEOUT_ENV = "CONVNETS_GIT_TIMEOUT"  # seconds one git command may take, all told
GIT_STALL_ENV = "CONVNETS_GIT_STALL_S"  # seconds a git transfer may stall (http, ssh) before it is dropped
MIRROR_LOCK_TIMEOUT_ENV = "CONVNETS_MIRROR_LOCK_TIMEOUT"  # seconds a run waits for the machine's mirror lock
DEFAULT_GIT_TIMEOUT_S = 1800.0  # a first fetch of a large history over a slow link, with room to spare
DEFAULT_GIT_STALL_S = 60.0
# Past the longest a holder may keep it: one fetch (bounded by the git timeout) and a clone.
DEFAULT_MIRROR_LOCK_TIMEOUT_S = DEFAULT_GIT_TIMEOUT_S + 600.0
LOW_SPEED_BYTES = 1000  # bytes/s below which an http transfer counts as stalled
STALLED = re.compile(r"Operation too slow|timed out|Timeout", re.IGNORECASE)
LOCK_POLL_S = 0.2
NETRC = " (netrc, credential helper)"
CREDENTIALS = {"ssh": " (ssh key, known_hosts)", "http": NETRC, "https": NETRC}  # what a refusal points at


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


def seconds_from(environ: Mapping[str, str], name: str, default: float) -> float:
    """A bound in seconds from the worker's environment; the default when unset or not a positive number."""
    try:
        value = float(environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def git_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """git's environment on a worker: it never prompts (no terminal to answer); an http transfer
    slower than LOW_SPEED_BYTES for the stall bound is dropped (curl otherwise waits on a silent
    server forever); ssh runs in batch mode and gives up on a host that does not answer instead
    of waiting for TCP's own timeout (minutes, or never).

    The low-speed limit goes in git's own GIT_HTTP_LOW_SPEED_* variables, which mean what
    `-c http.lowSpeedLimit=... -c http.lowSpeedTime=...` mean, so that git's argv stays the
    command itself. The worker's own GIT_SSH_COMMAND is kept, these options after it: ssh takes
    the first value of an option, so its own -o settings win.
    """
    stall = int(seconds_from(environ, GIT_STALL_ENV, DEFAULT_GIT_STALL_S))
    alive = max(1, min(15, stall))
    ssh = " ".join(
        [
            environ.get("GIT_SSH_COMMAND") or "ssh",
            "-o BatchMode=yes",
            f"-o ConnectTimeout={stall}",
            f"-o ServerAliveInterval={alive}",
            f"-o ServerAliveCountMax={max(1, stall // alive)}",
        ]
    )
    return {
        **environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_SSH_COMMAND": ssh,
        "GIT_HTTP_LOW_SPEED_LIMIT": str(LOW_SPEED_BYTES),
        "GIT_HTTP_LOW_SPEED_TIME": str(stall),
    }


def git(
    cwd: Path, *args: str, check: bool = True, remote: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """git in `cwd`, bounded (git_environment, $CONVNETS_GIT_TIMEOUT); remote: the URL it talks
    to, named in the one line it fails with when the remote does not answer; stdin: git's input.

    On the timeout subprocess.run kills git; git's own protocol (git://) ends with it, and its
    helpers for http and ssh end on their own bounds (the low-speed limit, ssh's ServerAlive).
    """
    limit = seconds_from(os.environ, GIT_TIMEOUT_ENV, DEFAULT_GIT_TIMEOUT_S)
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=git_environment(), timeout=limit
        )
    except subprocess.TimeoutExpired:
        raise WorkspaceError(
            unanswered(args, remote, f"did not finish within {limit:.0f} s ({GIT_TIMEOUT_ENV})")
        ) from None
    if check and proc.returncode != 0:
        said = redact(proc.stderr.strip())
        if remote is not None and STALLED.search(said):
            stall = seconds_from(os.environ, GIT_STALL_ENV, DEFAULT_GIT_STALL_S)
            raise WorkspaceError(unanswered(args, remote, f"stalled for {stall:.0f} s ({GIT_STALL_ENV})"))
        command = redact(" ".join(args))
        raise WorkspaceError(f"`git {command}` failed in {cwd}: {said}")
    return proc


def unanswered(args: Sequence[str], remote: str | None, what: str) -> str:
    """One line for a git command the remote left hanging: which remote, and what to check."""
    verb = next((arg for arg in args if not arg.startswith("-")), "")
    if remote is None:
        return f"`git {redact(' '.join(args))}` {what} on {host()}: check the remote it talks to"
    scheme, remote_host, _ = url_parts(remote)
    where = remote_host or redact(remote)
    return (
        f"git {verb} from {redact(remote)} {what} on {host()}: check that {where} is reachable from this "
        f"machine and answers (`git ls-remote {redact(remote)}`), and the credentials this worker uses for it"
        + CREDENTIALS.get(scheme, "")
    )


def ls_remote(
    repository: str, *patterns: str, cwd: Path | None = None, url: str | None = None
) -> list[tuple[str, str]]:
    """(commit, ref) pairs the git remote itself reports, never a stale local view of it.

    cwd: where git runs (a repository whose remote `repository` names); url: the remote's URL, for
    the line a remote that does not answer fails with (default: `repository`)."""
    refuse_options(repository=repository)
    proc = git(cwd or Path.cwd(), "ls-remote", "--", repository, *patterns, remote=url or repository)
    return [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines() if "\t" in line]


@contextlib.contextmanager
def clean_checkout(repository: str, commit: str, label: str) -> Iterator[Path]:
    """A fresh clone of `repository` at `commit`, removed on exit unless KeepCheckout is raised.

    The clone is made from this machine's mirror of `repository` (git_mirror), then its
    `origin` is set back to `repository`, so `dvc exp push origin` and the like go to the
    real remote, as from a plain clone. The run holds its folder's lock (run_folder_lock) from
    the moment the folder exists until the run leaves it.
    """
    refuse_options(repository=repository, commit=commit)
    folder = Path(tempfile.mkdtemp(prefix=f"{safe_name(label)}-", dir=work_root()))
    keep = False
    try:
        with run_folder_lock(folder):
            clone_at(repository, commit, folder)
            yield folder
    except KeepCheckout:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def clone_at(repository: str, commit: str, folder: Path) -> None:
    """Clone the machine's mirror of `repository` into `folder` and check `commit` out there."""
    with git_mirror(repository, commit) as mirror:
        git(folder.parent, "clone", "--quiet", "--no-checkout", "--local", "--", str(mirror), str(folder))
    git(folder, "remote", "set-url", "--", "origin", repository)
    # `git checkout` takes no end of options before a commit (`--` would make it a path):
    # it gets the full SHA git itself resolved, which cannot start with '-'.
    resolved = git(folder, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}", check=False)
    if resolved.returncode != 0:
        raise WorkspaceError(f"commit {commit[:7]} is not on {redact(repository)}: push it (git push) and submit again")
    git(folder, "checkout", "--quiet", "--detach", resolved.stdout.strip(), "--")


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """A shared flock on the run's folder itself, held while the run lives, which
    `python -m pipeline clean` honours (pipeline.clean.run_folder_locked tries an exclusive one):
    a live run's clone is never removed, however long the run has left it untouched (a long
    epoch, a slow push), and even where clean cannot see the run's processes (no /proc). The
    kernel lets go when the process dies, so a dead run's clone is free to go.
    Shared, so that another process of the same run may take it too; the descriptor is not
    inherited by the commands the run starts (Python's default), so a stray child keeps nothing.
    """
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield
    finally:
        os.close(handle)  # lets go of the lock


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

    The lock (an exclusive flock on <mirror>.lock, mirror_lock) serialises the fetches and clones
    of all runs on the machine: two runs starting together never fetch into, or clone from, a
    half-updated mirror. A clone from the mirror takes a fraction of a second; a fetch at most
    $CONVNETS_GIT_TIMEOUT, and a run waits for the lock no longer than $CONVNETS_MIRROR_LOCK_TIMEOUT.
    Other remotes have other mirrors and locks: a remote that hangs holds up only its own runs.
    """
    url = without_credentials(repository)
    tail = safe_name(url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")) or "repo"
    mirror = git_mirrors() / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.git"
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with mirror_lock(mirror.with_name(mirror.name + ".lock"), redact(url)):
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
                remote=repository,
            )
        yield mirror


@contextlib.contextmanager
def mirror_lock(path: Path, what: str) -> Iterator[None]:
    """The exclusive flock on `path`, waited for until $CONVNETS_MIRROR_LOCK_TIMEOUT at most.

    The holder writes who it is into the file (holder_line), so that a run that gives up can say
    in one line who holds the mirror; a holder that dies lets go with its file descriptor, and
    the next one overwrites the stale line.
    """
    limit = seconds_from(os.environ, MIRROR_LOCK_TIMEOUT_ENV, DEFAULT_MIRROR_LOCK_TIMEOUT_S)
    with open(path, "a+") as lock:  # a+: never truncated by a run that only waits
        if not wait_for_flock(lock, time.monotonic() + limit):
            raise WorkspaceError(
                f"the git mirror of {what} on {host()} is held by {read_holder(path)}; gave up after "
                f"{limit:.0f} s ({MIRROR_LOCK_TIMEOUT_ENV}): check what that run is doing (its flow run's "
                "log), or stop it"
            )
        lock.seek(0)
        lock.truncate()
        lock.write(holder_line())
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)  # released when the file is closed


def wait_for_flock(lock, deadline: float) -> bool:
    """Take the exclusive flock on `lock`, polling, until monotonic `deadline`; whether it was taken."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)


def holder_line() -> str:
    """Who holds a lock: this process, its machine, its flow run (the worker sets its id), since when."""
    since = datetime.now(UTC).isoformat(timespec="seconds")
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")
    return f"pid {os.getpid()} on {host()}" + (f", flow run {flow_run}" if flow_run else "") + f", since {since}"


def read_holder(path: Path) -> str:
    """The holder's own line in the lock file ("a run that did not say who it is": not yet written)."""
    try:
        said = path.read_text(encoding="utf-8").strip()
    except OSError:
        said = ""
    return said.splitlines()[0] if said else "a run that did not say who it is"


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
