"""Two workers on one machine: one user cache (run environments, DVC cache, clones, downloads),
one Prefect server on loopback, a bare git repository as `origin`, a local DVC remote. A sweep of
two tiny MNIST points must train on both workers at the same time (issue 25: the second point
used to wait for the first point's whole run, on the lock of their shared environment).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prefect_fleet import Processes, clone_env, free_port, processes_in, run, wait_for_server

from conftest import copy_working_tree, git
from pipeline import environments

pytestmark = pytest.mark.slow

TINY = ["split.train_size=300", "split.val_size=100", "split.test_size=100", "train.batch_size=32"]
# One epoch: with TensorFlow's start, 15 s of training each; the two points start within a second.
POINTS = ["train.learning_rate=0.001,0.002", "train.epochs=1"]
SWEEP_TIMEOUT_S = 600
REUSED_WITHIN_S = 10.0  # finding a built environment is a hash of uv.lock; waiting for a run is a whole run

# What each experiment's flow run logged, with Prefect's timestamps: its environment line and
# the DVC lines that start its train stage and the stage after it.
FLOW_RUN_LOGS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import LogSort
def stamp(time):
    return time.timestamp() if time else None
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dvc-experiment"])))
    found = []
    for flow_run in runs:
        lines, offset = [], 0
        while batch := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
            limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC,
        ):
            lines += [(log.timestamp.timestamp(), log.message) for log in batch]
            offset += len(batch)
        found.append({"name": flow_run.name, "state": flow_run.state.type.value,
                      "start": stamp(flow_run.start_time), "end": stamp(flow_run.end_time),
                      "logs": [(t, m) for t, m in lines if "Running stage" in m or "environment of uv.lock" in m]})
json.dump(found, sys.stdout)
"""


class OneMachine:
    """The fleet, with both workers sharing one XDG_CACHE_HOME as two workers of one user would."""

    def __init__(self, root: Path):
        self.root = root
        self.origin = root / "origin.git"
        self.submitter = root / "submitter"
        self.cache = root / "machine-cache"
        self.envs = self.cache / "convnets" / "envs"  # where the workers would put them by default
        self.port = free_port()
        self.env = clone_env(root, self.port, self.submitter)
        self.processes = Processes()
        self.logs: list[Path] = []
        # The machine has run this lock before (the everyday case, and the issue's): its environment
        # is built beside the server's start rather than inside the sweep, 30 to 60 s of the test.
        self.prebuild = threading.Thread(target=build_environment, args=(root / "source",))

    def start(self) -> None:
        source = copy_working_tree(self.root / "source")
        self.prebuild.start()
        git(self.root, "clone", "-q", "--bare", str(source), str(self.origin))
        git(self.root, "clone", "-q", str(self.origin), str(self.submitter))
        remote = str(self.root / "dvc-remote")
        run(["dvc", "remote", "modify", "--local", "storage", "url", remote], self.submitter, self.env)
        log = self.root / "server.log"
        command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui"]
        server = self.processes.start(command, self.root, clone_env(self.root, self.port), log)
        wait_for_server(server, self.port, log)
        run(["prefect", "work-pool", "create", "gpu", "--type", "process"], self.submitter, self.env)
        for name in ("w1", "w2"):
            self.start_worker(name)
        self.prebuild.join()

    def stop(self) -> None:
        self.processes.stop()
        if self.prebuild.is_alive():  # start() failed early: let its uv finish before the folder goes
            self.prebuild.join()

    def start_worker(self, name: str) -> None:
        home = self.root / f"{name}-home"
        home.mkdir()
        env = {
            **clone_env(self.root, self.port),
            "XDG_CACHE_HOME": str(self.cache),
            environments.ENVS_DIR_ENV: str(self.envs),
        }
        self.logs.append(self.root / f"{name}.log")
        command = ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1", "--name", name]
        self.processes.start(command, home, env, self.logs[-1])

    def sweep(self) -> subprocess.CompletedProcess:
        overrides = [flag for value in [*TINY, *POINTS] for flag in ("-S", value)]
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "sweep", *overrides, "--name-prefix", "side", "--timeout", "120"],
            cwd=self.submitter,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=SWEEP_TIMEOUT_S,
        )

    def flow_runs(self) -> list[dict]:
        return json.loads(run([sys.executable, "-c", FLOW_RUN_LOGS], self.submitter, self.env))

    def worker_logs(self) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-4000:]}" for log in self.logs)


def build_environment(checkout: Path) -> None:
    """The run environment of `checkout`'s uv.lock, for this machine, as a worker's run builds it."""
    with environments.environment_for(checkout):
        pass


@pytest.fixture
def machine(tmp_path_factory, monkeypatch):
    machine = OneMachine(tmp_path_factory.mktemp("one-machine"))
    monkeypatch.setenv(environments.ENVS_DIR_ENV, str(machine.envs))  # for the prebuild, in this process
    try:
        machine.start()
        yield machine
    finally:
        machine.stop()
    assert processes_in(machine.root) == []


def training_interval(flow_run: dict) -> tuple[float, float]:
    """From the log line that starts DVC's train stage to the one that starts the next stage."""
    starts = [(t, m) for t, m in flow_run["logs"] if "Running stage" in m]
    index = next(i for i, (_, message) in enumerate(starts) if "'train'" in message)
    return starts[index][0], starts[index + 1][0]


def test_two_workers_on_one_machine_train_side_by_side(machine):
    sweep = machine.sweep()
    assert sweep.returncode == 0, f"{sweep.stdout[-3000:]}\n{sweep.stderr[-5000:]}\n{machine.worker_logs()}"
    names = re.findall(r"^(side-train.learning_rate-0.00[12]-[0-9a-f]{6})\s.*\bdone\b", sweep.stdout, re.M)
    assert len(names) == 2, sweep.stdout
    points = [flow_run for flow_run in machine.flow_runs() if flow_run["name"] in names]
    assert len(points) == 2 and all(point["state"] == "COMPLETED" for point in points), points
    environments = [m for point in points for _, m in point["logs"] if "environment of uv.lock" in m]
    intervals = sorted(training_interval(point) for point in points)
    (_, first_end), (second_start, second_end) = intervals
    overlap = min(first_end, second_end) - second_start
    figures = f"training intervals {intervals}, overlap {overlap:.1f} s; {environments}"
    print(figures)  # the measured overlap, for the record (pytest -s)
    assert overlap > 0, figures
    # both points used the environment that the data-stage run built, and neither waited for it
    assert len(environments) == 2 and all(" reused in " in line for line in environments), figures
    waits = [float(re.search(r" in ([0-9.]+) s", line).group(1)) for line in environments]
    assert max(waits) < REUSED_WITHIN_S, figures
