"""Train on a `gpu` work pool for real: a Prefect server on loopback, a process worker in a
second clone, a local DVC remote between the two clones, the MNIST sample with tiny params.

Everything is started here and stopped in `finally`, process groups and all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import copy_working_tree, git

pytestmark = pytest.mark.slow

TINY = ["-S", "train.epochs=1", "-S", "split.train_size=300", "-S", "split.val_size=100", "-S", "split.test_size=100"]
SERVER_START_S = 180
FLOW_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clone_env(tmp_path: Path, port: int, checkout: Path | None = None) -> dict[str, str]:
    """This venv first on PATH, Prefect state under tmp_path, the clone's own code first on sys.path."""
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if checkout is not None:
        # The venv is shared: without this the editable install would serve /work/main's code.
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(checkout / "src")])
    return env


class Processes:
    """Background processes, each in its own session; stop() ends them and all their children."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
        handle = log.open("w")
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        handle.close()
        self.started.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in reversed(self.started):   # workers before the server they talk to
            stop_tree(proc)


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group and every descendant (flow runs may start their own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
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


def test_train_runs_on_the_gpu_pool_worker_and_comes_back_through_dvc(tmp_path):
    origin = copy_working_tree(tmp_path / "origin")
    parent, worker = tmp_path / "parent", tmp_path / "worker"
    for clone in (parent, worker):
        git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert git(parent, "rev-parse", "HEAD") == git(worker, "rev-parse", "HEAD")

    port = free_port()
    server_env = clone_env(tmp_path, port)
    parent_env = clone_env(tmp_path, port, parent)
    worker_env = {**clone_env(tmp_path, port, worker), "CONVNETS_CHECKOUT": str(worker)}
    for clone in (parent, worker):   # both clones use one local DVC remote (config.local: not in git)
        run(["dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "dvc-remote")], clone, server_env)

    processes = Processes()
    try:
        server_log = tmp_path / "server.log"
        server = processes.start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                 tmp_path, server_env, server_log)
        wait_for_server(server, port, server_log)
        run(["prefect", "work-pool", "create", "gpu", "--type", "process"], parent, parent_env)
        run(["prefect", "work-pool", "set-concurrency-limit", "gpu", "1"], parent, parent_env)
        run(["prefect", "--no-prompt", "deploy", "--name", "train-gpu"], parent, parent_env)
        worker_log = tmp_path / "worker.log"
        processes.start(["prefect", "worker", "start", "--pool", "gpu", "--type", "process"],
                        worker, worker_env, worker_log)

        flow = subprocess.run([sys.executable, "-m", "pipeline", *TINY], cwd=parent, env=parent_env,
                              capture_output=True, text=True, timeout=FLOW_TIMEOUT_S)
        output = flow.stdout + flow.stderr
        assert flow.returncode == 0, f"flow failed:\n{output[-8000:]}\n--- worker:\n{worker_log.read_text()[-5000:]}"
    finally:
        processes.stop()

    # the parent sent train away and only restored its result, through DVC's run cache
    assert "train: ran on gpu" in flow.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in output
    # it ran in the worker's clone: its outputs and lock entry are there, matching the parent's
    worker_text = worker_log.read_text()
    assert f"'train' ran in {worker.resolve()}" in worker_text
    assert (worker / "data/model/model.keras").is_file()
    assert not (worker / "data/raw").exists()   # the worker only pulled what train reads
    parent_lock = yaml.safe_load((parent / "dvc.lock").read_text())["stages"]
    worker_lock = yaml.safe_load((worker / "dvc.lock").read_text())["stages"]
    assert parent_lock["train"]["outs"] == worker_lock["train"]["outs"]
    assert parent_lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    # the parent carried on with evaluate and report and ends clean
    assert (parent / "data/report/report.html").is_file()
    status = run(["dvc", "status", "--json"], parent, server_env)
    assert json.loads(status) == {}
    # no process of ours is left
    assert processes_in(tmp_path) == []
