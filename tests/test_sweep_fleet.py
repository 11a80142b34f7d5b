"""Sweeps and nightly runs on a real fleet: a Prefect server on loopback with basic authentication
on, a bare git repository as `origin`, a local DVC remote, two process workers on pool `gpu` and one
on pool `cpu`, each started in a folder that is no checkout with an allow-list of the repositories
it runs (docs/orchestration.md, "Workers"); and, for the halving test, two more workers on pool
`pair` that share one user cache, as two workers of one user on one machine would. Tiny MNIST
experiments.

The tests of this module share that fleet and run in order: a sweep, the same sweep again, a halving
sweep of new points on the shared machine, the nightly deployment after a new commit, a worker
killed mid-training; then, while Prefect waits out that run's crash window (90 s of silence),
commits that change the locked dependencies, run from a second checkout by pool cpu's untouched
worker; and last the killed worker's point, which ends on the other worker.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect_fleet import (
    Processes,
    clone_env,
    free_port,
    processes_in,
    run,
    seed_database,
    stop_tree,
    wait_for_server,
)
from tiny_packages import PROBE_MODULE, add_wheel_dependency, make_wheel

from conftest import copy_working_tree, git
from convnets.environment import lock_digest
from pipeline.nightly import experiment_name

pytestmark = pytest.mark.slow

TINY = [
    "-S",
    "split.train_size=300",
    "-S",
    "split.val_size=100",
    "-S",
    "split.test_size=100",
    "-S",
    "train.batch_size=32",
    # no Grad-CAM or example pages: 3 to 4 s of every run that no test here looks at
    "-S",
    "evaluate.heatmaps=0",
    "-S",
    "report.misclassified_examples=0",
]
GRID = ["-S", "train.learning_rate=0.001,0.002", "-S", "train.epochs=1"]
SWEEP_TIMEOUT_S = 900
HEARTBEAT_S = 30  # Prefect's minimum: a killed worker's experiment run is declared crashed after 90 s
# Prefect's basic authentication: the server's string, and every client's (the submitter, the workers and
# the flow runs they start). The password must appear in no log or output.
PASSWORD = "fleet-pass-7c1e"
AUTH = f"admin:{PASSWORD}"


# The run environment of a checkout's uv.lock, built as a worker's run builds it (in the user cache).
PREBUILD = """
import sys
from pathlib import Path
from pipeline.environments import environment_for
with environment_for(Path(sys.argv[1])):
    pass
"""


@dataclass
class Preempted:
    """A sweep running in the background (its output in `log`) whose point lost its worker."""

    sweep: subprocess.Popen
    log: Path
    survivor: str  # the other worker of pool gpu


class Fleet:
    def __init__(self, root: Path, database: Path):
        self.root = root
        self.database = database  # the migrated database the server starts on a copy of
        self.origin = root / "origin.git"
        self.submitter = root / "submitter"
        self.dvc_remote = root / "dvc-remote"
        self.port = free_port()
        self.env = self.env_in(self.submitter)
        self.processes = Processes()
        self.workers: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.machine_cache = root / "machine-cache"  # pool `pair`'s two workers share it
        self.preempted: Preempted | None = None  # the sweep whose worker a test killed, still going on

    def env_in(self, checkout: Path) -> dict[str, str]:
        """A submitter's environment in `checkout`: the fleet's API and credentials, the checkout's code."""
        return {**clone_env(self.root, self.port, checkout), "PREFECT_API_AUTH_STRING": AUTH}

    def clone(self, name: str) -> Path:
        """A checkout of origin's main with the fleet's DVC remote, as each person's own clone."""
        checkout = self.root / name
        git(self.root, "clone", "-q", str(self.origin), str(checkout))
        run(
            ["dvc", "remote", "modify", "--local", "storage", "url", str(self.dvc_remote)],
            checkout,
            self.env_in(checkout),
        )
        return checkout

    def start(self) -> None:
        source = copy_working_tree(self.root / "source")
        # The shared machine has run this lock before (the everyday case, and issue 25's): its
        # environment is built beside the server's start rather than inside a test.
        prebuild = subprocess.Popen(
            [sys.executable, "-c", PREBUILD, str(source)],
            cwd=self.root,
            env={**self.env, "PYTHONPATH": str(source), "XDG_CACHE_HOME": str(self.machine_cache)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            self.start_fleet(source)
        finally:
            _, err = prebuild.communicate(timeout=600)
        assert prebuild.returncode == 0, err

    def start_fleet(self, source: Path) -> None:
        git(self.root, "clone", "-q", "--bare", str(source), str(self.origin))
        self.clone(self.submitter.name)
        seed_database(self.database, self.root / "prefect-home")
        log = self.root / "server.log"
        server = self.processes.start(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui"],
            self.root,
            {**clone_env(self.root, self.port), "PREFECT_SERVER_API_AUTH_STRING": AUTH},
            log,
        )
        wait_for_server(server, self.port, log)
        template = self.heartbeat_template()
        for pool in ("gpu", "cpu", "pair"):
            run(
                ["prefect", "work-pool", "create", pool, "--type", "process", "--base-job-template", str(template)],
                self.submitter,
                self.env,
            )
        for name, pool in (("w1", "gpu"), ("w2", "gpu"), ("nightly", "cpu")):
            self.start_worker(name, pool, self.root / f"{name}-cache")

    def heartbeat_template(self) -> Path:
        """A process pool's base job template whose runs beat every HEARTBEAT_S (its env): the sweep
        gives its experiment runs that period, and derives the crash automation's window from it."""
        template = self.root / "process-template.json"
        run(
            ["prefect", "work-pool", "get-default-base-job-template", "--type", "process", "--file", str(template)],
            self.submitter,
            self.env,
        )
        job = json.loads(template.read_text())
        job["variables"]["properties"]["env"]["default"] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
        template.write_text(json.dumps(job))
        return template

    @contextlib.contextmanager
    def pair(self) -> Iterator[None]:
        """Pool `pair`'s two workers, p1 and p2, for the block only: each idle worker's polling costs
        the server CPU that the other tests of this module would rather have."""
        for name in ("p1", "p2"):
            self.start_worker(name, "pair", self.machine_cache)
        try:
            yield
        finally:
            for name in ("p1", "p2"):
                stop_tree(self.workers[name][0])

    def start_worker(self, name: str, pool: str, cache: Path) -> None:
        """A worker in an empty folder of its own, with the user cache `cache` (its own: as on its own
        machine), that runs only the fleet's repository and DVC remote."""
        home = self.root / f"{name}-home"
        home.mkdir(exist_ok=True)
        env = {
            **clone_env(self.root, self.port),
            "PREFECT_API_AUTH_STRING": AUTH,
            "XDG_CACHE_HOME": str(cache),
            "CONVNETS_TRUSTED_REPOSITORIES": f"{self.origin} {self.dvc_remote}",
        }
        log = self.root / f"{name}.log"
        proc = self.processes.start(
            ["prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1", "--name", name],
            home,
            env,
            log,
        )
        self.workers[name] = (proc, log)

    def log(self, name: str) -> str:
        return self.workers[name][1].read_text(errors="replace")

    def sweep(self, *args: str, checkout: Path | None = None) -> subprocess.CompletedProcess:
        """`python -m pipeline sweep` in `checkout` (the submitter's by default), to its end."""
        checkout = checkout or self.submitter
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "sweep", *args],
            cwd=checkout,
            env=self.env_in(checkout),
            capture_output=True,
            text=True,
            timeout=SWEEP_TIMEOUT_S,
        )

    def experiments(self) -> dict[str, dict]:
        """name -> metrics files of each experiment in the submitter's `dvc exp show`."""
        shown = json.loads(run(["dvc", "exp", "show", "--json", "-A"], self.submitter, self.env))
        found = {}
        for commit in shown:
            for exp in commit.get("experiments") or []:
                for rev in exp["revs"]:
                    found[rev["name"]] = {
                        path: entry.get("data", {}) for path, entry in (rev["data"].get("metrics") or {}).items()
                    }
        return found

    def flow_runs(self, flow_name: str) -> list[dict]:
        script = f"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[{flow_name!r}])))
def stamp(time):
    return time.timestamp() if time else None
print(json.dumps([{{"name": r.name, "state": r.state.type.value, "start": stamp(r.start_time),
                    "end": stamp(r.end_time)}} for r in runs]))
"""
        return json.loads(run([sys.executable, "-c", script], self.submitter, self.env))


def stage_runs(fleet: Fleet, stage: str) -> int:
    return sum(fleet.log(name).count(f"Running stage '{stage}'") for name in fleet.workers)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, prefect_database):
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), prefect_database)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.processes.stop()
    assert processes_in(fleet.root) == []


def failure(fleet: Fleet, proc: subprocess.CompletedProcess) -> str:
    logs = "\n".join(f"--- {name}:\n{fleet.log(name)[-4000:]}" for name in fleet.workers)
    return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n{logs}"


def test_a_sweep_fans_out_over_both_workers_and_comes_home(fleet):
    sweep = fleet.sweep(*TINY, *GRID, "--timeout", "120")
    assert sweep.returncode == 0, failure(fleet, sweep)
    names = [
        re.search(rf"^(sweep-train.learning_rate-0.00{i}-[0-9a-f]{{6}})\s.*\bdone\b", sweep.stdout, re.M)
        for i in (1, 2)
    ]
    assert all(names), sweep.stdout
    names = [match.group(1) for match in names]
    # all three in the submitter's `dvc exp show`, with their test accuracy
    experiments = fleet.experiments()
    for name in names:
        assert 0 < experiments[name]["data/eval/metrics.json"]["test"]["accuracy"] <= 1
    # both workers ran at least one, at the same time
    for worker in ("w1", "w2"):
        assert any(name in fleet.log(worker) for name in names), worker
    runs = [r for r in fleet.flow_runs("dvc-experiment") if r["name"] in names]
    assert len(runs) == 2 and all(r["state"] == "COMPLETED" for r in runs)
    runs.sort(key=lambda r: r["start"])
    assert any(a["end"] > b["start"] for a, b in zip(runs, runs[1:])), runs
    # the data stages ran once, for both
    assert stage_runs(fleet, "preprocess") == 1 and stage_runs(fleet, "train") == 2
    # on the cpu pool: the GPU workers decode no photos
    assert "Running stage 'preprocess'" in fleet.log("nightly")
    # and they received none: the data-stage run's dvc.lock let each point skip fetch's outputs
    handed = "the data-stage run's dvc.lock holds the data stages as this run needs them: --allow-missing"
    assert sum(fleet.log(worker).count(handed) for worker in ("w1", "w2")) == 2
    assert not any("Pulling data for stage: 'fetch'" in fleet.log(worker) for worker in ("w1", "w2"))
    # the API refuses whoever lacks the fleet's credentials; the workers run only the allow-listed
    # repository; the password is in no output or log
    request = urllib.request.Request(f"http://127.0.0.1:{fleet.port}/api/flow_runs/filter", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(request, timeout=10)
    logs = [fleet.log(name) for name in fleet.workers] + [(fleet.root / "server.log").read_text(errors="replace")]
    assert not any("runs any repository" in log for log in logs)
    assert not any(PASSWORD in text for text in [sweep.stdout, sweep.stderr, *logs])
    # nobody's folder was touched and no clone was left behind
    for worker in ("w1", "w2"):
        assert list((fleet.root / f"{worker}-home").iterdir()) == []
        assert list((fleet.root / f"{worker}-cache" / "convnets" / "runs").iterdir()) == []
    # the command the sweep printed to bring one home, run as printed in the submitting checkout
    (command,) = [line for line in sweep.stdout.splitlines() if line.startswith("dvc exp ")]
    best = command.rsplit(" ", 1)[-1]
    assert best in names, command
    run(["bash", "-c", command], fleet.submitter, fleet.env)
    assert (fleet.submitter / "data/model/model.keras").is_file()
    for metrics in ("data/train/metrics.json", "data/eval/metrics.json"):
        assert json.loads((fleet.submitter / metrics).read_text()) == experiments[best][metrics], metrics
    git(fleet.submitter, "checkout", "-q", "HEAD", "--", ".")  # HEAD again, clean, for the next sweeps
    git(fleet.submitter, "clean", "-fdq")


# What each experiment's flow run logged, with Prefect's timestamps: its environment line and the
# DVC lines that start its stages.
FLOW_RUN_LOGS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import LogSort
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dvc-experiment"])))
    found = []
    for flow_run in [r for r in runs if r.name in sys.argv[1:]]:
        lines, offset = [], 0
        while batch := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
            limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC,
        ):
            lines += [(log.timestamp.timestamp(), log.message) for log in batch]
            offset += len(batch)
        found.append({"name": flow_run.name, "state": flow_run.state.type.value,
                      "logs": [(t, m) for t, m in lines if "Running stage" in m or "environment of uv.lock" in m]})
json.dump(found, sys.stdout)
"""
REUSED_WITHIN_S = 10.0  # finding a built environment is a hash of uv.lock; waiting for a run is a whole run


def training_interval(flow_run: dict) -> tuple[float, float]:
    """From the log line that starts DVC's train stage to the one that starts the next stage."""
    starts = [(t, m) for t, m in flow_run["logs"] if "Running stage" in m]
    index = next(i for i, (_, message) in enumerate(starts) if "'train'" in message)
    return starts[index][0], starts[index + 1][0]


def test_the_same_sweep_again_trains_nothing(fleet):
    trained = stage_runs(fleet, "train")
    sweep = fleet.sweep(*TINY, *GRID, "--timeout", "120")
    assert sweep.returncode == 0, failure(fleet, sweep)
    assert sweep.stdout.count("already done") == 2, sweep.stdout
    assert stage_runs(fleet, "train") == trained


def test_a_halving_sweep_stops_the_losing_points_and_continues_the_others_from_their_checkpoints(fleet):
    """2 points, 2 epochs, factor 2: both to epoch 1 (stopped, state kept), the better one goes on to
    epoch 2 from its own state, 3 epochs of the grid's 4. On pool `pair`, whose two workers share one
    user cache (run environments, DVC cache, clones, downloads), as two workers on one machine do
    (issue 25: the second point used to wait for the first point's whole run, on the lock of their
    shared environment): the first rung's two trainings overlap, and neither waits for the environment.

    New points on the commit and data params of the first sweep: its data-stage run published its
    dvc.lock entries, so no data-stage run now, and every run of the sweep skips the data stages."""
    resumed = "resuming train at epoch 2 of 2"
    grid = ["-S", "train.learning_rate=0.0011,0.0012", "-S", "train.epochs=2"]
    args = ("--halving", "2", "--pool", "pair", "--name-prefix", "halving", "--timeout", "120")
    data_runs = [r for r in fleet.flow_runs("dvc-experiment") if r["name"].endswith("-data")]
    with fleet.pair():
        sweep = fleet.sweep(*TINY, *grid, *args)
    assert sweep.returncode == 0, failure(fleet, sweep)
    assert "data stages already run for" in sweep.stdout + sweep.stderr
    assert [r for r in fleet.flow_runs("dvc-experiment") if r["name"].endswith("-data")] == data_runs
    handed = "the data-stage run's dvc.lock holds the data stages as this run needs them: --allow-missing"
    assert sum(fleet.log(worker).count(handed) for worker in ("p1", "p2")) == 3  # two first rungs, one finalist
    assert "epochs trained: 3 of the full grid's 4" in sweep.stdout, sweep.stdout
    experiments = fleet.experiments()
    first = [name for name in experiments if name.startswith("halving-") and name.endswith("-e1")]
    final = [name for name in experiments if name.startswith("halving-") and not name.endswith("-e1")]
    assert len(first) == 2 and len(final) == 1, sorted(experiments)
    assert all(name + "-e1" in first for name in final)  # `dvc exp show` lists a point's rungs together
    for name in final:
        assert experiments[name]["data/train/metrics.json"]["step"] == 1  # two epochs in its history
        assert 0 < experiments[name]["data/eval/metrics.json"]["test"]["accuracy"] <= 1
    # the finalist trained only its second epoch, from its own state
    assert sum(fleet.log(worker).count(resumed) for worker in ("p1", "p2")) == 1
    rows = [line for line in sweep.stdout.splitlines() if line.startswith("halving-")]
    assert len(rows) == 2 and rows[0].split()[0] in final  # one row per point, the winner first
    assert_side_by_side(fleet, first)


def assert_side_by_side(fleet: Fleet, names: list[str]) -> None:
    """Both workers of the machine ran one of `names`, their trainings overlapped (Prefect's log
    timestamps), and each found the machine's environment built."""
    points = json.loads(run([sys.executable, "-c", FLOW_RUN_LOGS, *names], fleet.submitter, fleet.env))
    assert len(points) == 2 and all(point["state"] == "COMPLETED" for point in points), points
    assert all(any(name in fleet.log(worker) for name in names) for worker in ("p1", "p2"))
    environments = [m for point in points for _, m in point["logs"] if "environment of uv.lock" in m]
    intervals = sorted(training_interval(point) for point in points)
    (_, first_end), (second_start, second_end) = intervals
    overlap = min(first_end, second_end) - second_start
    figures = f"training intervals {intervals}, overlap {overlap:.1f} s; {environments}"
    print(figures)  # the measured overlap, for the record (pytest -s)
    assert overlap > 0, figures
    assert len(environments) == 2 and all(" reused in " in line for line in environments), figures
    waits = [float(re.search(r" in ([0-9.]+) s", line).group(1)) for line in environments]
    assert max(waits) < REUSED_WITHIN_S, figures


def test_nightly_runs_the_new_head_of_main_and_brings_it_home(fleet):
    (fleet.submitter / "NOTES.md").write_text("a change since the last sweep\n")
    git(fleet.submitter, "add", "NOTES.md")
    git(fleet.submitter, "commit", "-q", "-m", "a new commit on main")
    git(fleet.submitter, "push", "-q", "origin", "HEAD:main")
    commit = git(fleet.submitter, "rev-parse", "HEAD").strip()
    run(["prefect", "--no-prompt", "deploy", "--name", "nightly"], fleet.submitter, fleet.env)
    overrides = [o for o in TINY if o != "-S"] + ["train.epochs=1"]
    params = [
        "--param",
        f"repository={fleet.origin}",
        "--param",
        f"dvc_remote={fleet.dvc_remote}",
        "--param",
        "overrides=" + json.dumps(overrides),
    ]
    run(
        ["prefect", "deployment", "run", "dvc-nightly/nightly", *params, "--watch"],
        fleet.submitter,
        fleet.env,
        timeout=SWEEP_TIMEOUT_S,
    )
    nightly = [r for r in fleet.flow_runs("dvc-nightly") if r["state"] == "COMPLETED"]
    assert len(nightly) == 1, nightly
    name = experiment_name(commit, overrides)  # nightly-<sha>-<digest of the overrides>
    run(["dvc", "exp", "pull", "origin", name], fleet.submitter, fleet.env)
    assert 0 < fleet.experiments()[name]["data/eval/metrics.json"]["test"]["accuracy"] <= 1
    # nothing new on main: the next run says so and trains nothing
    trained = stage_runs(fleet, "train")
    out = run(
        ["prefect", "deployment", "run", "dvc-nightly/nightly", *params, "--watch"],
        fleet.submitter,
        fleet.env,
        timeout=SWEEP_TIMEOUT_S,
    )
    assert "nothing changed on main" in fleet.log("nightly"), out
    assert stage_runs(fleet, "train") == trained


PREEMPTED_EPOCHS = 10


def test_a_worker_killed_mid_training_leaves_its_sweep_waiting_for_prefects_crash_window(fleet):
    """A point of 10 epochs on pool gpu; its worker goes (SIGKILL, with its run's processes) once
    the point has mirrored two epochs. Prefect declares the run crashed only when its heartbeats
    have stopped for 90 s: the sweep waits that out in the background while the next test uses
    pool cpu, and the test after it sees the point end on the other worker."""
    log = fleet.root / "preempted-sweep.log"
    args = [*TINY, "-S", f"train.epochs={PREEMPTED_EPOCHS}", "--name-prefix", "preempted", "--timeout", "120"]
    sweep = fleet.processes.start([sys.executable, "-m", "pipeline", "sweep", *args], fleet.submitter, fleet.env, log)
    mirror = fleet.root / "dvc-remote-train-resume"
    deadline = time.monotonic() + 600
    while not any(re.fullmatch(r"epoch-000[2-9]", p.read_text().strip()) for p in mirror.glob("*/LATEST")):
        reached = sweep.poll() is None and time.monotonic() < deadline
        assert reached, f"training did not reach epoch 2:\n{log.read_text(errors='replace')[-6000:]}"
        time.sleep(0.1)
    victim = next(name for name in ("w1", "w2") if "preempted-" in fleet.log(name))
    kill_tree(fleet.workers[victim][0])
    fleet.preempted = Preempted(sweep, log, survivor="w2" if victim == "w1" else "w1")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started, as a preempted machine would go."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def commit_all(checkout: Path, message: str) -> str:
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", message)
    git(checkout, "push", "-q", "origin", "HEAD:main")
    return git(checkout, "rev-parse", "HEAD").strip()


def experiment_lock(fleet: Fleet, checkout: Path, sweep: subprocess.CompletedProcess) -> str:
    """The lock hash the experiment's train stage recorded (data/train/devices.json), read through DVC."""
    name = re.search(r"^(deps-\S+)\s.*\bdone\b", sweep.stdout, re.M).group(1)
    refs = git(checkout, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    (commit,) = [line.split()[0] for line in refs if line.endswith(f"/{name}")]
    script = "import dvc.api, sys; print(dvc.api.read('data/train/devices.json', rev=sys.argv[1]))"
    devices = json.loads(run([sys.executable, "-c", script, commit], checkout, fleet.env_in(checkout)))
    return devices["environment"]["lock"]


def test_a_dependency_change_runs_on_the_untouched_worker_in_its_own_environment(fleet):
    """Commit B adds a package that train imports; C's lock cannot be installed; D is B again.

    All on pool cpu, whose one worker has run commit A (the nightly test) and is not touched; from
    a checkout of its own, while pool gpu's killed run (the test before) waits out its crash window.
    """
    submitter = fleet.clone("submitter-deps")
    one_point = [*TINY, "-S", "train.epochs=1", "--pool", "cpu", "--timeout", "120"]
    make_wheel(submitter / "vendor")
    add_wheel_dependency(submitter, next((submitter / "vendor").iterdir()))
    train = submitter / "src/convnets/train.py"
    future = "from __future__ import annotations\n"
    train.write_text(
        train.read_text().replace(future, f"{future}import {PROBE_MODULE}  # noqa: F401  (only in B's environment)\n")
    )
    commit_all(submitter, "B: train needs a new package")
    lock_b = lock_digest(submitter / "uv.lock")

    sweep = fleet.sweep(*one_point, "--name-prefix", "deps-b", checkout=submitter)
    assert sweep.returncode == 0, failure(fleet, sweep)
    # B's data stages are A's (only train and the lock changed): the data-stage run of A serves B
    assert "data stages already run for" in sweep.stdout + sweep.stderr, failure(fleet, sweep)
    assert f"environment of uv.lock {lock_b[:12]} built" in fleet.log("nightly")
    assert experiment_lock(fleet, submitter, sweep) == lock_b[:12]

    # C: the lock names a wheel that is not there; the run fails saying which and whose lock
    add_wheel_dependency(submitter, make_wheel(submitter / "gone", name="convnets-gone"))
    shutil.rmtree(submitter / "gone")
    commit_all(submitter, "C: a lock that cannot be installed")
    lock_c = lock_digest(submitter / "uv.lock")
    sweep = fleet.sweep(*one_point, "--name-prefix", "deps-c", checkout=submitter)
    assert sweep.returncode == 1, failure(fleet, sweep)
    refused = rf"uv.lock {lock_c[:12]} cannot be installed: package convnets[-_]gone"
    assert re.search(refused, sweep.stdout + sweep.stderr), failure(fleet, sweep)

    # D: B's tree again; the same worker goes on, reusing B's environment. Another learning rate, so
    # that train runs there rather than coming from B's run cache; the data stages are still A's.
    git(submitter, "revert", "--no-edit", "HEAD")
    git(submitter, "push", "-q", "origin", "HEAD:main")
    assert lock_digest(submitter / "uv.lock") == lock_b
    sweep = fleet.sweep(*one_point, "-S", "train.learning_rate=0.003", "--name-prefix", "deps-d", checkout=submitter)
    assert sweep.returncode == 0, failure(fleet, sweep)
    assert "data stages already run for" in sweep.stdout + sweep.stderr, failure(fleet, sweep)
    assert f"environment of uv.lock {lock_b[:12]} reused" in fleet.log("nightly")
    assert fleet.log("nightly").count(f"environment of uv.lock {lock_b[:12]} built") == 1


def test_the_killed_workers_point_ends_on_the_other_worker_and_costs_at_most_one_epoch(fleet):
    preempted = fleet.preempted
    if preempted is None:
        pytest.fail("no sweep lost its worker: see test_a_worker_killed_mid_training_leaves_...")
    preempted.sweep.wait(timeout=SWEEP_TIMEOUT_S)
    out, survivor_log = preempted.log.read_text(errors="replace"), fleet.log(preempted.survivor)
    assert preempted.sweep.returncode == 0, f"{out}\n--- {preempted.survivor}:\n{survivor_log[-6000:]}"
    assert "crashed" in out
    assert "took the state of" in survivor_log
    assert re.search(rf"resuming train at epoch \d+ of {PREEMPTED_EPOCHS}", survivor_log)
    experiments = fleet.experiments()
    (name,) = [n for n in experiments if n.startswith("preempted-")]
    assert experiments[name]["data/train/metrics.json"]["step"] == PREEMPTED_EPOCHS - 1
    assert not list((fleet.root / "dvc-remote-train-resume").iterdir())  # deleted once training succeeded
