"""A real Prefect server, work pools and process workers on loopback, for the orchestration tests.

Everything is started in its own session and stopped with all its children (flow runs
start their own processes), so no test leaves a process behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SERVER_START_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clone_env(tmp_path: Path, port: int, checkout: Path | None = None) -> dict[str, str]:
    """This venv first on PATH, Prefect state under tmp_path, the clone's own code first on sys.path.

    Heartbeats every 30 s (Prefect's minimum), so a killed worker's run is declared crashed
    after 90 s (pipeline.prefect_api.ensure_crash_detection).
    """
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # as docs/orchestration.md starts workers; each poll costs the server CPU
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # Workers get user caches of their own (XDG_CACHE_HOME), but build run environments from
        # this machine's uv cache: as fast as `make install` made it, never a second download.
        "UV_CACHE_DIR": uv_cache_dir(),
    }
    if checkout is not None:
        # The venv is shared: without this the editable install would serve the main checkout's code.
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(checkout / "src")])
    return env


def migrated_database(folder: Path) -> Path:
    """An empty Prefect database with every migration applied, made once in `folder` for all the
    processes of a test session. A server started on a new database spends 12 CPU-s on Alembic's
    migrations (about two thirds of its start); started on a copy of this one, it only checks them."""
    database = folder / "prefect.db"
    with (folder.parent / f"{folder.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other test process waits for the first one's
        if not database.exists():
            building = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=folder.parent))
            env = {
                **{k: v for k, v in os.environ.items() if "DATABASE" not in k},  # the default: PREFECT_HOME's
                "PREFECT_HOME": str(building),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
            run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], building, env)
            assert not list(building.glob("prefect.db-*")), "SQLite left a journal beside the database"
            building.rename(folder)
    return database


def seed_database(database: Path, prefect_home: Path) -> None:
    """Where a server whose PREFECT_HOME is `prefect_home` looks for its database: a copy of `database`."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(database, prefect_home / "prefect.db")


@contextlib.contextmanager
def seeded_test_harness(database: Path) -> Iterator[None]:
    """Prefect's prefect_test_harness, its server started on a copy of `database` (migrated_database).

    The harness puts its database, prefect-test.db, in a new folder of tempfile.mkdtemp: that folder
    gets the copy. Should a later Prefect name it otherwise, the server migrates a new one, as before.
    """
    from prefect.testing import utilities

    def seeded_folder() -> str:
        folder = tempfile.mkdtemp()
        shutil.copy(database, Path(folder) / "prefect-test.db")
        return folder

    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(utilities, "mkdtemp", seeded_folder)
            stack.enter_context(utilities.prefect_test_harness(server_startup_timeout=180))
        yield


def uv_cache_dir() -> str:
    from pipeline.environments import uv_binary

    found = subprocess.run([uv_binary(), "cache", "dir"], capture_output=True, text=True, check=True)
    return found.stdout.strip()


class Processes:
    """Background processes, each in its own session; stop() ends them and all their children."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
        handle = log.open("w")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.started.append((proc, log))
        return proc

    def stop(self) -> None:
        stop_trees([proc for proc, _ in reversed(self.started)])


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group and every descendant (flow runs may start their own)."""
    stop_trees([proc])


def stop_trees(procs: list[subprocess.Popen]) -> None:
    """stop_tree for all of `procs` at once: one 10-s grace for them together, not one each (a Prefect
    worker can ignore SIGTERM for minutes, so each would cost the whole grace)."""
    family = []
    for proc in procs:
        if proc.poll() is not None:  # ended and reaped: its pid may be another process's by now
            continue
        try:
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        if not alive:
            break
    for proc in procs:
        proc.wait(timeout=10)


def processes_in(folder: Path) -> list[str]:
    """Processes still working in `folder` (ours: the server, worker and flow runs)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if Path(process.cwd()).is_relative_to(folder):
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            continue
    return found


def wait_for_server(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """stdout of a command that must succeed."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{output[-5000:]}"
    return proc.stdout
