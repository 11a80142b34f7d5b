"""Every wait of a worker and of a sweep is bounded, and the line that ends it names what hung
(issue 25, item 3): git and DVC against a remote that never answers, the machine's mirror lock, a
run that stays RUNNING, a sweep past its --deadline; and what a run holds stays held while it waits
(its clone, against `python -m pipeline clean`), and what it checks asks the remote itself.

The git and DVC cases use a local server that accepts connections and never says a word; the
bounds are set small through the worker's environment variables, as a worker's would be set large.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import git
from pipeline import clean, dvc, experiment, remote, results, waiting, workspace
from pipeline.grid import Point

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as pipeline.__main__ sets it, on import


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Path:
    """One worker machine: its work folder and git mirrors under tmp_path, small bounds."""
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.GIT_MIRRORS_ENV, str(tmp_path / "mirrors"))
    monkeypatch.setenv("CONVNETS_GIT_STALL_S", "2")
    monkeypatch.setenv("CONVNETS_GIT_TIMEOUT", "60")
    return tmp_path


def small_origin(tmp_path: Path) -> tuple[Path, str]:
    """A bare `origin` with one commit."""
    work, origin = tmp_path / "work", tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    (work / "f").write_text("one\n")
    git(work, "add", "f")
    git(work, "commit", "-q", "-m", "one")
    git(work, "push", "-q", str(origin), "main")
    return origin, git(work, "rev-parse", "HEAD").strip()


class SilentServer:
    """Accepts every connection and never answers: a remote that hangs after the handshake."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self):
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()  # a git still waiting (the code before the bounds) gets its EOF here


def in_thread(work) -> tuple[threading.Thread, dict]:
    """Run `work` in a thread; its result, error and seconds land in the dict."""
    report: dict = {}

    def run():
        started = time.monotonic()
        try:
            report["result"] = work()
        except Exception as exc:
            report["error"] = exc
        report["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, report


def checkout(repository: str, commit: str, label: str) -> str:
    with workspace.clean_checkout(repository, commit, label) as clone:
        return git(clone, "rev-parse", "HEAD").strip()


@pytest.mark.parametrize(
    ("url", "bound"),
    [
        ("http://alice:s3cr3t@127.0.0.1:{port}/team/stalled.git", "http low-speed limit"),
        ("ssh://alice@127.0.0.1:{port}/team/stalled.git", "ssh ConnectTimeout"),
        ("git://127.0.0.1:{port}/team/stalled.git", "the subprocess timeout"),
    ],
)
def test_a_remote_that_never_answers_fails_within_the_bound_naming_it_and_other_runs_go_on(
    machine, monkeypatch, silent_server, url, bound
):
    if bound == "the subprocess timeout":  # git's own protocol has no low-speed limit: only the timeout ends it
        monkeypatch.setenv("CONVNETS_GIT_TIMEOUT", "3")
    origin, commit = small_origin(machine)
    stalled = url.format(port=silent_server.port)
    hung, report = in_thread(lambda: checkout(stalled, commit, "hung"))

    # Meanwhile another run on the machine (another repository, another mirror) goes on.
    assert checkout(str(origin), commit, "other") == commit
    assert hung.is_alive(), "the stalled run should still be waiting while the other one finished"

    hung.join(timeout=30)
    assert not hung.is_alive(), f"a git remote that never answers hung the run past 30 s ({bound})"
    error = report["error"]
    assert isinstance(error, workspace.WorkspaceError)
    line = str(error)
    assert "\n" not in line and f"127.0.0.1:{silent_server.port}/team/stalled.git" in line
    assert "s3cr3t" not in line and "check" in line, line
    assert report["seconds"] < 15, f"{bound}: {report['seconds']:.1f} s"
    assert list((machine / "runs").iterdir()) == []  # the failed run's clone folder is gone


HOLDER = """
import sys
from pipeline import workspace
with workspace.git_mirror(sys.argv[1], sys.argv[2]):
    print('in', flush=True)
    sys.stdin.readline()
"""


def test_the_mirror_lock_is_waited_for_until_a_deadline_then_names_its_holder(machine, monkeypatch):
    origin, commit = small_origin(machine)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(origin), commit],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PREFECT__FLOW_RUN_ID": "7b0c0ffe-run"},
    )
    try:
        assert holder.stdout.readline().strip() == "in"
        monkeypatch.setenv("CONVNETS_MIRROR_LOCK_TIMEOUT", "1")
        waiter, report = in_thread(lambda: checkout(str(origin), commit, "waiter"))
        waiter.join(timeout=20)
        assert not waiter.is_alive(), "the mirror lock was waited for past 20 s"
        line = str(report["error"])
        assert isinstance(report["error"], workspace.WorkspaceError) and "\n" not in line
        assert f"pid {holder.pid}" in line and workspace.host() in line and "7b0c0ffe-run" in line, line
        assert "CONVNETS_MIRROR_LOCK_TIMEOUT" in line and report["seconds"] < 10

        holder.communicate("\n", timeout=30)  # once it lets go, the next run takes the mirror
        monkeypatch.setenv("CONVNETS_MIRROR_LOCK_TIMEOUT", "10")
        assert checkout(str(origin), commit, "next") == commit
    finally:
        if holder.poll() is None:
            holder.kill()


# --- DVC's transfers ---------------------------------------------------------------------------


def dvc_project(machine: Path, remote_url: str) -> Path:
    """A git and DVC project with one file in DVC's cache, its remote `remote_url` as a run's clone has it."""
    project = machine / "project"
    subprocess.run(["git", "init", "-q", "-b", "main", str(project)], check=True)
    dvc.check_dvc(project, ["init", "-q"])
    (project / "data.txt").write_text("some data\n")
    dvc.check_dvc(project, ["add", "-q", "data.txt"])
    experiment.configure_dvc(project, remote_url)  # the DVC remote of a worker's run
    return project


@pytest.mark.parametrize(
    ("command", "call"),
    [
        ("dvc push", lambda project: dvc.check_dvc(project, ["push"])),
        ("dvc status --cloud", lambda project: experiment.outputs_not_on_remote(project)),
    ],
)
def test_a_dvc_transfer_to_a_remote_that_never_answers_stops_within_the_bound_naming_it(
    machine, monkeypatch, silent_server, command, call
):
    monkeypatch.setenv(workspace.DVC_CACHE_ENV, str(machine / "dvc-cache"))
    url = f"http://alice:s3cr3t@127.0.0.1:{silent_server.port}/team/dvc-store"
    project = dvc_project(machine, url)
    monkeypatch.setenv("CONVNETS_DVC_TIMEOUT", "2")
    hung, report = in_thread(lambda: call(project))
    hung.join(timeout=30)
    assert not hung.is_alive(), f"`{command}` to a DVC remote that never answers hung past 30 s"
    error = report["error"]
    assert isinstance(error, dvc.DvcTimeout) and isinstance(error, dvc.DvcError), repr(error)
    line = str(error)
    assert "\n" not in line and f"`{command}" in line and "CONVNETS_DVC_TIMEOUT" in line and "2 s" in line, line
    assert f"127.0.0.1:{silent_server.port}/team/dvc-store" in line and "s3cr3t" not in line, line
    assert report["seconds"] < 15, f"{command}: {report['seconds']:.1f} s"
    assert not clean.inside(clean.paths_open_here(), project), "DVC's process group was left running"


def test_a_dvc_timeout_is_transient_and_a_stage_run_has_no_wall_clock_bound(monkeypatch):
    """The flow retries a transfer that timed out; a training's time is bounded by the sweep (--run-timeout)."""
    from prefect.states import Failed

    from pipeline import tasks

    assert tasks.retry_if_transient(None, None, Failed(data=dvc.DvcTimeout("`dvc push` did not finish")))
    assert not tasks.retry_if_transient(None, None, Failed(data=dvc.DvcError("`dvc push` exited with 1")))
    monkeypatch.setenv("CONVNETS_DVC_TIMEOUT", "2")
    assert dvc.dvc_bound(["push", "--run-cache"]) == 2
    assert dvc.dvc_bound(["exp", "push", "--no-cache", "origin", "x"]) == 2
    assert dvc.dvc_bound(["exp", "run", "--pull", "-n", "x"]) is None
    assert dvc.dvc_bound(["repro", "--pull", "fetch"]) is None
    monkeypatch.delenv("CONVNETS_DVC_TIMEOUT")
    assert dvc.dvc_bound(["pull"]) == dvc.DEFAULT_DVC_TIMEOUT_S >= 3600


def test_a_timed_out_exp_push_names_the_git_remote_and_no_token(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    git(tmp_path, "remote", "add", "origin", "https://alice:t0ken@git.example.org/team/r.git")
    line = dvc.timed_out(tmp_path, ["exp", "push", "--no-cache", "origin", "sweep-1"], 7200)
    assert "`dvc exp push --no-cache origin sweep-1` did not finish within 7200 s (CONVNETS_DVC_TIMEOUT)" in line
    assert "git remote origin (https://***@git.example.org/team/r.git)" in line and "t0ken" not in line, line
    line = dvc.timed_out(tmp_path, ["exp", "pull", "https://bob:s3cr3t@git.example.org/r.git", "sweep-1"], 60)
    assert "s3cr3t" not in line and "git.example.org/r.git" in line, line


# --- a live run's clone stays, however long it waits ---------------------------------------------


def test_a_runs_clone_is_locked_for_its_whole_life_so_clean_never_removes_it(machine):
    origin, commit = small_origin(machine)
    with pytest.raises(workspace.KeepCheckout), workspace.clean_checkout(str(origin), commit, "idle") as clone:
        two_hours_ago = time.time() - 2 * 3600  # idle past clean's grace: only the lock keeps it
        for entry in [clone, *clone.rglob("*")]:
            os.utime(entry, (two_hours_ago, two_hours_ago), follow_symlinks=False)
        assert clean.run_folder_locked(clone), "a live run's clone is not locked"
        assert str(clone) not in {item.path for item in clean.plan(in_use=clean.run_folder_locked)}
        raise workspace.KeepCheckout("its push failed: the clone stays")
    assert not clean.run_folder_locked(clone), "the run ended and its clone is still locked"
    assert str(clone) in {item.path for item in clean.plan(in_use=clean.run_folder_locked)}


# --- check_pushed asks the remote --------------------------------------------------------------


@pytest.fixture
def clones(tmp_path) -> SimpleNamespace:
    """A bare `origin`, the submitter's clone `mine` (origin/main fetched once) and a colleague's `theirs`."""
    origin, mine, theirs = tmp_path / "origin.git", tmp_path / "mine", tmp_path / "theirs"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(mine)], check=True)
    git(mine, "commit", "-q", "--allow-empty", "-m", "one")
    git(mine, "remote", "add", "origin", str(origin))
    git(mine, "push", "-q", "origin", "main")  # also sets origin/main in `mine`
    git(tmp_path, "clone", "-q", str(origin), str(theirs))
    return SimpleNamespace(origin=origin, mine=mine, theirs=theirs)


def test_check_pushed_finds_a_commit_pushed_from_another_clone_though_the_local_view_is_stale(clones):
    """`theirs` pushed two commits; `mine` has the first (from `theirs` directly), not origin's new tip."""
    git(clones.theirs, "commit", "-q", "--allow-empty", "-m", "two")
    two = git(clones.theirs, "rev-parse", "HEAD").strip()
    git(clones.theirs, "branch", "wip")  # what `mine` fetches from its colleague: `two`, not `three`
    git(clones.theirs, "commit", "-q", "--allow-empty", "-m", "three")
    git(clones.theirs, "push", "-q", "origin", "main")
    git(clones.mine, "fetch", "-q", str(clones.theirs), "wip")
    git(clones.mine, "checkout", "-q", "--detach", two)
    stale = git(clones.mine, "rev-parse", "origin/main")
    remote.check_pushed(clones.mine, two)  # an ancestor of origin's main, which `mine` had never seen
    assert git(clones.mine, "rev-parse", "origin/main") == stale  # nobody's refs were moved
    git(clones.mine, "commit", "-q", "--allow-empty", "-m", "mine only")
    with pytest.raises(remote.RemoteStageError, match="not on 'origin'.*git push"):
        remote.check_pushed(clones.mine, git(clones.mine, "rev-parse", "HEAD").strip())


def test_check_pushed_refuses_a_commit_whose_branch_was_deleted_on_the_remote(clones):
    git(clones.mine, "checkout", "-q", "-b", "feature")
    git(clones.mine, "commit", "-q", "--allow-empty", "-m", "feature")
    feature = git(clones.mine, "rev-parse", "HEAD").strip()
    git(clones.mine, "push", "-q", "origin", "feature")
    remote.check_pushed(clones.mine, feature)
    git(clones.theirs, "push", "-q", "origin", "--delete", "feature")  # origin/feature stays in `mine`
    with pytest.raises(remote.RemoteStageError, match=f"{feature[:7]} is not on 'origin'.*git push"):
        remote.check_pushed(clones.mine, feature)


def test_check_pushed_against_a_remote_that_never_answers_fails_within_the_bound(clones, machine, silent_server):
    git(clones.mine, "remote", "set-url", "origin", f"http://alice:s3cr3t@127.0.0.1:{silent_server.port}/r.git")
    started = time.monotonic()
    with pytest.raises(remote.RemoteStageError) as failed:
        remote.check_pushed(clones.mine, git(clones.mine, "rev-parse", "HEAD").strip())
    line = str(failed.value)
    assert "\n" not in line and "CONVNETS_GIT_STALL_S" in line and "s3cr3t" not in line, line
    assert time.monotonic() - started < 15


# --- the sweep's side: a run that stays RUNNING, a sweep past its deadline ----------------------


def flow_run(state: str, name: str = "r"):
    final = state in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
    return SimpleNamespace(
        id=uuid.uuid4(),
        name=name,
        total_run_time=None,
        state=SimpleNamespace(
            type=SimpleNamespace(value=state), name=state.title(), message="", is_final=lambda: final
        ),
    )


class FakeClient:
    """The Prefect client wait_for talks to: runs in fixed states, a worker online, cancels recorded."""

    def __init__(self, runs):
        self.runs = runs
        self.cancelled: dict = {}
        self.asked = {"runs": 0, "workers": 0}  # requests, by what they read

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_runs(self, flow_run_filter, **kwargs):
        self.asked["runs"] += 1
        asked = set(flow_run_filter.id.any_)
        return [run for run in self.runs if run.id in asked and run.id not in self.cancelled]

    def read_workers_for_work_pool(self, pool, **kwargs):
        self.asked["workers"] += 1
        return [object()]  # heartbeats keep coming: nothing else would ever end the wait

    def set_flow_run_state(self, flow_run_id, state, force=False):
        self.cancelled[flow_run_id] = state


@pytest.fixture
def fake_prefect(monkeypatch):
    import prefect.client.orchestration

    def install(runs) -> FakeClient:
        client = FakeClient(runs)
        monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: client)
        monkeypatch.setattr(waiting, "POLL_S", 0.01)
        return client

    return install


def waited(outcomes, **bounds) -> tuple[list[str], float]:
    """wait_for in a thread, so that a wait without a bound fails the test instead of hanging it."""
    logs: list[str] = []
    thread, report = in_thread(lambda: waiting.wait_for(outcomes, "gpu", 60, logs.append, **bounds))
    thread.join(timeout=10)
    assert not thread.is_alive(), "wait_for still waits on a RUNNING run"
    if "error" in report:
        raise report["error"]
    return logs, report["seconds"]


def test_a_run_that_stays_running_past_its_bound_is_cancelled_and_counted_as_failed(fake_prefect):
    stuck, finished = flow_run("RUNNING", "stuck"), flow_run("COMPLETED", "finished")
    client = fake_prefect([stuck, finished])
    outcomes = [
        results.Outcome(Point(("seed=1",), "a"), flow_run_id=stuck.id, attempts=1),
        results.Outcome(Point(("seed=2",), "b"), flow_run_id=finished.id, attempts=1),
    ]
    logs, seconds = waited(outcomes, run_timeout_s=0.3)
    assert seconds < 5
    assert outcomes[1].status == "done"
    assert outcomes[0].status == "timed out" and not outcomes[0].ok
    assert client.cancelled[stuck.id].type.value == "CANCELLING"  # its worker stops the process
    (line,) = [line for line in logs if line.startswith("a:")]
    assert "0 s" in line and "--run-timeout" in line and "cancelled" in line, line


def test_a_sweep_asks_for_the_pools_workers_only_while_a_run_waits_for_one(fake_prefect):
    """While every run trains, a poll is one request: the pool's workers are not read."""
    training = flow_run("RUNNING", "training")
    client = fake_prefect([training])
    waited([results.Outcome(Point(("seed=1",), "a"), flow_run_id=training.id, attempts=1)], run_timeout_s=0.3)
    assert client.asked["runs"] > 5 and client.asked["workers"] == 0, client.asked

    queued = flow_run("SCHEDULED", "queued")
    client = fake_prefect([queued])
    outcome = results.Outcome(Point(("seed=1",), "a"), flow_run_id=queued.id, attempts=1)
    waited([outcome], deadline=time.monotonic() + 0.3)
    assert client.asked["runs"] > 5 and client.asked["workers"] == client.asked["runs"], client.asked


def test_past_the_deadline_the_sweep_cancels_what_is_left_and_says_how_to_resume(fake_prefect):
    pending, running = flow_run("SCHEDULED", "waiting"), flow_run("RUNNING", "running")
    client = fake_prefect([pending, running])
    outcomes = [
        results.Outcome(Point(("seed=1",), "a"), flow_run_id=pending.id, attempts=1),
        results.Outcome(Point(("seed=2",), "b"), flow_run_id=running.id, attempts=1),
    ]
    logs, seconds = waited(outcomes, deadline=time.monotonic() + 0.3)
    assert seconds < 5
    assert [o.status for o in outcomes] == ["past deadline"] * 2
    assert client.cancelled[pending.id].type.value == "CANCELLED"  # nobody took it: cancelled at once
    assert client.cancelled[running.id].type.value == "CANCELLING"
    assert any("deadline" in line for line in logs)


def test_the_sweep_command_exits_non_zero_naming_the_points_left_and_how_to_resume(monkeypatch, capsys):
    import pipeline.flows
    from pipeline import __main__ as cli

    outcomes = [
        results.Outcome(Point(("seed=1",), "sweep-seed-1"), status="done"),
        results.Outcome(Point(("seed=2",), "sweep-seed-2"), status="past deadline", message="cancelled"),
        results.Outcome(Point(("seed=3",), "sweep-seed-3"), status="past deadline", message="cancelled"),
    ]
    rows = [
        {"experiment": o.point.name, "status": o.status + (f": {o.message}" if o.message else "")} for o in outcomes
    ]
    failed = results.ExperimentsFailed(outcomes, rows)
    seen = {}

    def fake_sweep(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(result=lambda raise_on_failure: failed)

    monkeypatch.setattr(pipeline.flows, "dvc_sweep", fake_sweep)
    code = cli.main(["sweep", "-S", "seed=1,2,3", "--deadline", "3600", "--run-timeout", "600"])
    assert code != 0
    assert seen["deadline"] == 3600 and seen["run_timeout"] == 600
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "--deadline" in line]
    assert "sweep-seed-2, sweep-seed-3" in line and "sweep-seed-1" not in line
    assert "same command" in line and "skip" in line, line


def test_past_the_deadline_nothing_more_is_submitted():
    """A later rung of a halving sweep, or the points after a slow data-stage run: none is submitted."""
    from pipeline import sweep

    outcomes = [results.Outcome(Point(("seed=1",), "a")), results.Outcome(Point(("seed=2",), "b"))]
    assert sweep.not_past_deadline(outcomes, time.monotonic() + 60) == outcomes
    assert sweep.not_past_deadline(outcomes, None) == outcomes
    assert sweep.not_past_deadline(outcomes, time.monotonic() - 1) == []
    assert [o.status for o in outcomes] == ["past deadline"] * 2
