"""The `dvc` command line as the flows see it: run it, stream its output, read its verdict.

DVC stays a black box: the flows only call its command line (its stable interface) and
read what it prints. Everything that depends on DVC's wording lives in this module.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from convnets.downloads import TRANSIENT_FAILURE
from pipeline.workspace import git, host, redact, seconds_from

# `python -m dvc` of this interpreter, so the flow, DVC and the stages share one venv,
# unless the run names another environment (VIRTUAL_ENV, as `activate` sets it: a worker's
# environment built from the run's own uv.lock, pipeline.environments).
DVC_COMMAND: tuple[str, ...] = (sys.executable, "-m", "dvc")

# A stage that fails prints "error: ..." (convnets.cli.stage_main); DVC then adds "ERROR: ...".
STAGE_ERROR = "error:"
DVC_ERROR = "ERROR:"
BAD_PARAMS = "error: invalid parameters"

# Failures worth another try: DVC's lock held by another DVC process, and a transient network
# error (URL, object store or Kaggle) that outlasted the fetch stage's own retries, in the one
# form convnets.downloads writes it ("could not download ... after N tries"). A refusal (401,
# 403, 404) or a missing local file reads "could not download ...: ..." and fails at once.
TRANSIENT_PATTERNS = (
    re.compile(r"Unable to acquire lock"),
    TRANSIENT_FAILURE,
    # How the fetch stage of older commits (a worker runs any commit) ended on a transient HTTP error.
    re.compile(r"could not download .+: HTTP (408|425|429|5\d\d)\b"),
)

# The bound on one dvc command other than a stage run (docs/orchestration.md, "Every wait bounded"):
# a push, pull or `status --cloud` against a remote that accepts and never answers otherwise hangs
# the run forever while its worker's heartbeats keep it RUNNING.
DVC_TIMEOUT_ENV = "CONVNETS_DVC_TIMEOUT"
DEFAULT_DVC_TIMEOUT_S = 7200.0  # a first push or pull of a large data set over a slow link, with room to spare
# Commands that run stages get no wall-clock bound here: their time is mostly training, which the
# sweep bounds from outside (--run-timeout cancels the run; its worker stops the process group).
# One number here would cut a long training short, or be too long to matter for a transfer.
RUNS_STAGES = (("repro",), ("exp", "run"))

TAIL_LINES = 200  # output kept for error messages
FALLBACK_LINES = 15  # shown when the stage printed no "error:" line (e.g. a traceback)


class DvcError(Exception):
    """A `dvc` command other than a stage run failed; the message holds its output."""


class DvcTimeout(DvcError):
    """A `dvc` command did not finish within $CONVNETS_DVC_TIMEOUT and was stopped: a remote that did
    not answer, which may answer later, so a transient failure (pipeline.tasks.retry_if_transient)."""


class StageFailed(Exception):
    """A stage failed for a reason another try will not fix (bad params, bad data, a bug)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


class TransientStageError(StageFailed):
    """A stage failed for a reason that may pass (a held lock, the network): retry it."""


class StageRanLocally(Exception):
    """DVC started to run a stage the flow expected to restore from a worker's result."""


@dataclass(frozen=True)
class DvcRun:
    args: tuple[str, ...]
    returncode: int
    tail: tuple[str, ...]  # last TAIL_LINES lines of stdout + stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def dvc_command(env: dict[str, str] | None = None) -> list[str]:
    """`python -m dvc` of the environment `env` activates (VIRTUAL_ENV), else of this interpreter."""
    venv = (env or {}).get("VIRTUAL_ENV")
    return [str(Path(venv) / "bin" / "python"), "-m", "dvc"] if venv else list(DVC_COMMAND)


def dvc_env() -> dict[str, str]:
    """The environment for `dvc`: this venv's bin first, since stage commands call `python`."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",  # stage output reaches the log as it is printed
    }


def run_dvc(
    project: Path,
    args: Sequence[str],
    on_line: Callable[[str], None] = lambda line: None,
    stop_on: Callable[[str], bool] | None = None,
    keep: int | None = TAIL_LINES,
    env: dict[str, str] | None = None,
) -> DvcRun:
    """Run `dvc <args>` in `project`, handing each output line to `on_line` as it comes.

    If `stop_on(line)` is true for a line, DVC (and the stage it started) is stopped and
    StageRanLocally is raised. `keep` lines of output are kept (None: all); `env` adds
    variables to DVC's environment. The process
    runs in its own group so that stopping it, or cancelling the flow, never leaves a
    stage running behind. A command other than a stage run is stopped after dvc_bound(args)
    seconds: DvcTimeout.
    """
    tail: deque[str] = deque(maxlen=keep)
    proc = start_dvc(project, args, env)
    limit = dvc_bound(args)
    try:
        with Deadline(proc, limit) as deadline:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                on_line(line)
                if stop_on is not None and stop_on(line):
                    raise StageRanLocally(line)
            proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc)
    if deadline.expired.is_set() and proc.returncode != 0:
        raise DvcTimeout(timed_out(project, args, limit))
    return DvcRun(tuple(args), proc.returncode, tuple(tail))


def dvc_bound(args: Sequence[str]) -> float | None:
    """Seconds `dvc <args>` may take ($CONVNETS_DVC_TIMEOUT); None for a command that runs stages."""
    if any(tuple(args[: len(command)]) == command for command in RUNS_STAGES):
        return None
    return seconds_from(os.environ, DVC_TIMEOUT_ENV, DEFAULT_DVC_TIMEOUT_S)


class Deadline:
    """Stops `proc`'s process group once `limit` seconds have passed (None: never); `expired` says
    whether it did. A timer thread, because the reader blocks on a pipe a silent remote never fills."""

    def __init__(self, proc: subprocess.Popen, limit: float | None):
        self.expired = threading.Event()
        self.timer = None if limit is None else threading.Timer(limit, self.expire, [proc])

    def expire(self, proc: subprocess.Popen) -> None:
        self.expired.set()
        stop_group(proc)

    def __enter__(self) -> Deadline:
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.cancel()


def timed_out(project: Path, args: Sequence[str], limit: float) -> str:
    """One line for a dvc command stopped at its bound: the command, the bound, the remote it talked to."""
    return (
        f"`dvc {redact(' '.join(args))}` did not finish within {limit:.0f} s ({DVC_TIMEOUT_ENV}) on {host()} and was "
        f"stopped; it talks to {talks_to(project, args)}: check that it is reachable from this machine and "
        "answers, and the credentials this worker uses for it"
    )


def talks_to(project: Path, args: Sequence[str]) -> str:
    """The remote a dvc command talks to, credentials redacted: the git remote of `exp push/pull`,
    else the DVC remote (`-r NAME`, or the project's default one)."""
    if tuple(args[:2]) in (("exp", "push"), ("exp", "pull")):
        positional = [arg for arg in args[2:] if not arg.startswith("-")]
        name = positional[0] if positional else "origin"
        url = git_remote_url(project, name)
        return f"git remote {redact(name)}" + (f" ({redact(url)})" if url != name else "")
    name = option_value(args, ("-r", "--remote"))
    remotes = dvc_remotes(project)
    name = name or remotes.get("", "")
    url = remotes.get(name)
    return f"DVC remote {name} ({redact(url)})" if url else f"the DVC remote {name or '(default)'}"


def option_value(args: Sequence[str], names: tuple[str, ...]) -> str | None:
    for index, arg in enumerate(args):
        if arg in names and index + 1 < len(args):
            return args[index + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def dvc_remotes(project: Path) -> dict[str, str]:
    """{name: url} of the project's DVC remotes ("": the default's name), as DVC itself reads its config
    (.dvc/config, config.local and the user's and system's levels merged)."""
    from dvc.config import Config

    config = Config(dvc_dir=os.fspath(project / ".dvc"), validate=False)
    remotes = {name: section["url"] for name, section in config["remote"].items() if "url" in section}
    return {**remotes, "": config["core"].get("remote", "")}


def git_remote_url(project: Path, name: str) -> str:
    """The URL of git remote `name` in `project` (`name` itself when it is a URL, or no such remote)."""
    proc = git(project, "remote", "get-url", "--", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else name


def start_dvc(project: Path, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`dvc <args>` in its own process group, stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        [*dvc_command(env), *args],
        cwd=project,
        env={**dvc_env(), **(env or {})},
        text=True,
        errors="replace",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=1,
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def check_dvc(
    project: Path,
    args: Sequence[str],
    on_line: Callable[[str], None] = lambda line: None,
    keep: int | None = TAIL_LINES,
    env: dict[str, str] | None = None,
) -> DvcRun:
    """Run `dvc <args>` (`env` as for run_dvc); DvcError with its output if it fails."""
    run = run_dvc(project, args, on_line, keep=keep, env=env)
    if not run.ok:
        output = "\n".join(run.tail[-FALLBACK_LINES:])
        raise DvcError(f"`dvc {' '.join(args)}` exited with {run.returncode}:\n{output}")
    return run


def dvc_json(project: Path, args: Sequence[str], env: dict[str, str] | None = None) -> object:
    """Run a `dvc ... --json` command and parse its stdout (its warnings go to stderr); bounded as
    run_dvc's commands are, in a process group of its own for the same reason."""
    proc = subprocess.Popen(
        [*dvc_command(env), *args, "--json"],
        cwd=project,
        env={**dvc_env(), **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    limit = dvc_bound(args)
    try:
        with Deadline(proc, limit) as deadline:
            stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            stop_group(proc)
    if deadline.expired.is_set() and proc.returncode != 0:
        raise DvcTimeout(timed_out(project, args, limit))
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)} --json` exited with {proc.returncode}:\n{stderr.strip()}")
    return json.loads(stdout or "null")


# --- one `dvc repro` for several stages, read stage by stage -----------------------------

# The line with which DVC starts each stage of a `dvc repro`: it runs it, restores it from
# the run cache, pulls it, or finds it up to date.
STAGE_START = re.compile(
    r"^(?:Running stage '(?P<ran>[^']+)':"
    r"|Stage '(?P<stage>[^']+)' (?:didn't change|is cached)"
    r"|'(?P<source>[^']+)' didn't change"
    r"|Pulling data for stage: '(?P<pulled>[^']+)')"
)


def stage_started(line: str) -> str | None:
    """The stage a line of `dvc repro` output starts, if it starts one."""
    match = STAGE_START.match(line)
    return next((name for name in match.groups() if name), None) if match else None


class ReproRun:
    """`dvc repro --single-item s1 s2 ...`: one DVC process for consecutive stages, read stage by stage.

    Each DVC start costs 0.5-1 s (its imports, then reading dvc.yaml, dvc.lock and the
    params into its index), so the stages share one; the flow still gets one task, one log
    and one outcome per stage, because DVC starts each stage with a line of its own. DVC
    runs the stages in the order given (dependencies first) and decides for each whether
    it runs. A stage asked for when no process is running (the first, or a retry after a
    failure) starts DVC again from that stage. Use it as a context manager: leaving it
    stops a DVC still running, with the stage it started.
    """

    def __init__(self, project: Path, stages: Sequence[str], pull: bool = False, env: dict[str, str] | None = None):
        self.project, self.stages, self.pull, self.env = project, list(stages), pull, env
        self._proc: subprocess.Popen | None = None
        self._args: tuple[str, ...] = ()
        self._next_line: str | None = None  # already read: the first line of the next stage

    def __enter__(self) -> ReproRun:
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            stop_group(self._proc)
        self._proc = None

    def stage(
        self,
        stage: str,
        on_line: Callable[[str], None] = lambda line: None,
        stop_on: Callable[[str], bool] | None = None,
    ) -> DvcRun:
        """The output of `stage`, up to the line that starts the next one or to DVC's exit.

        stop_on: as for run_dvc (DVC is stopped and StageRanLocally raised).
        """
        position = self.stages.index(stage)
        if self._proc is None:
            self._start(self.stages[position:])
        later = set(self.stages[position + 1 :])
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        assert self._proc is not None and self._proc.stdout is not None
        pending = [self._next_line] if self._next_line is not None else []
        self._next_line = None
        for raw in itertools.chain(pending, self._proc.stdout):
            line = raw.rstrip("\n")
            if stage_started(line) in later:
                self._next_line = line
                return DvcRun(self._args, 0, tuple(tail))
            tail.append(line)
            on_line(line)
            if stop_on is not None and stop_on(line):
                self.__exit__()
                raise StageRanLocally(line)
        returncode = self._proc.wait()
        self._proc = None
        return DvcRun(self._args, returncode, tuple(tail))

    def _start(self, stages: list[str]) -> None:
        self._args = ("repro", *stages, "--single-item", *(["--pull"] if self.pull else []))
        self._proc = start_dvc(self.project, self._args, self.env)


# --- reading a stage's run -------------------------------------------------------------


def stage_outcome(stage: str, lines: Sequence[str]) -> str:
    """'ran', 'restored' (from DVC's run cache or the remote) or 'skipped' (up to date)."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if f"Stage '{stage}' is cached" in text or "Pulling data for" in text:
        return "restored"
    return "skipped"


def starts_running(stage: str) -> Callable[[str], bool]:
    """A stop_on predicate: true on the line where DVC starts the stage's command."""
    marker = f"Running stage '{stage}'"
    return lambda line: line.startswith(marker)


def stage_failure(stage: str, run: DvcRun) -> StageFailed:
    """The exception for a failed stage run: transient (retry) or not, with the stage's message."""
    message = failure_message(run.tail)
    text = "\n".join(run.tail)
    if BAD_PARAMS not in text and any(p.search(text) for p in TRANSIENT_PATTERNS):
        return TransientStageError(stage, message)
    return StageFailed(stage, message)


def failure_message(lines: Sequence[str]) -> str:
    """The stage's own "error: ..." lines plus DVC's verdict, or the output's last lines."""
    dvc_errors = [line for line in lines if line.startswith(DVC_ERROR)]
    starts = [i for i, line in enumerate(lines) if line.startswith(STAGE_ERROR)]
    if starts:
        first = starts[0]
        end = next((i for i in range(first, len(lines)) if lines[i].startswith(DVC_ERROR)), len(lines))
        message = list(lines[first:end])
    else:
        message = [line for line in lines[-FALLBACK_LINES:] if line not in dvc_errors]
    return "\n".join([*message, *dvc_errors]).strip()
