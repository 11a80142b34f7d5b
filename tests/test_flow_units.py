"""The Prefect flows against a fake `dvc` (at the subprocess boundary) and a real tiny DVC run.

One temporary Prefect API (prefect_test_harness, on a migrated database) serves every test of this module.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

# Prefect reads PREFECT_HOME when first imported (and creates it): a throw-away folder,
# never ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="convnets-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect_fleet import seeded_test_harness  # noqa: E402

from pipeline import artifacts, dvc, remote, tasks  # noqa: E402
from pipeline.dag import StageGraph, UnknownStage, parse_dot  # noqa: E402
from pipeline.flows import dvc_pipeline  # noqa: E402

STAGES = ["fetch", "split", "preprocess", "train", "evaluate", "report"]
EDGES = [
    ("fetch", "split"),
    ("fetch", "preprocess"),
    ("split", "preprocess"),
    ("preprocess", "train"),
    ("preprocess", "evaluate"),
    ("train", "evaluate"),
    ("evaluate", "report"),
    ("train", "report"),
]
LOCKED = "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly."
BAD_PARAMS = (
    "Running stage 'split':\n> python -m convnets.split data/raw data/split\n"
    "error: invalid parameters\nsplit.train_size: Input should be greater than 0\n"
    "ERROR: failed to reproduce 'split': failed to run: python -m convnets.split "
    "data/raw data/split, exited with 2"
)
NETWORK = (
    "Running stage 'fetch':\nerror: could not download https://example.org/mnist.npz "
    "after 4 tries: timed out\nERROR: failed to reproduce 'fetch': failed to run: "
    "python -m convnets.fetch data/raw, exited with 1"
)

# Answers like dvc 3 for the commands the flows use; every call is logged in the state file.
# The flows run some at the same time (publish_metrics beside publish_report): each call holds the
# state's lock from its read to its exit, and writes it whole with a rename, or one read the other's
# half-written file (JSONDecodeError, under load) or lost its calls.
FAKE_DVC = textwrap.dedent("""
    import fcntl, json, os, sys
    from pathlib import Path
    state_path = Path(os.environ["FAKE_DVC_STATE"])
    lock = open(f"{state_path}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the process exits
    state = json.loads(state_path.read_text())
    args = sys.argv[1:]
    state["calls"].append(args)

    def done(code=0, out=""):
        partial = state_path.with_name(f"{state_path.name}.{os.getpid()}")
        partial.write_text(json.dumps(state))
        os.replace(partial, state_path)
        if out:
            print(out, flush=True)
        sys.exit(code)

    if args[:2] == ["dag", "--dot"]:
        lines = ["strict digraph {"] + [f'"{n}";' for n in state["nodes"]]
        lines += [f'"{a}" -> "{b}";' for a, b in state["edges"]] + ["}"]
        done(out="\\n".join(lines))
    if args[0] == "repro":
        for stage in [arg for arg in args[1:] if not arg.startswith("--")]:
            failures = state["failures"].get(stage, [])
            if failures:
                failure = failures.pop(0)
                done(failure.get("code", 1), failure["output"])
            if stage in state["up_to_date"]:
                print(f"Stage '{stage}' didn't change, skipping", flush=True)
            else:
                print(f"Running stage '{stage}':\\n> python -m convnets.{stage}\\n{stage}: done", flush=True)
                print("Updating lock file 'dvc.lock'\\n", flush=True)
        done(out="Use `dvc push` to send your updates to remote storage.")
    if args[0] == "status":
        done(out="{}")
    if args[:2] == ["metrics", "diff"]:
        done(out=json.dumps(state["metrics"]))
    if args[:2] == ["params", "diff"]:
        done(out=json.dumps(state["params"]))
    if args[:2] == ["exp", "save"]:
        done(out="Experiment has been saved as: fake-exp")
    print(f"fake dvc: unexpected arguments {args}", file=sys.stderr)
    done(3)
""")


@pytest.fixture(scope="module", autouse=True)
def prefect_api(prefect_database):
    with seeded_test_harness(prefect_database):
        yield


class FakeDvc:
    def __init__(self, state_path: Path):
        self.state_path = state_path

    def set(self, **changes) -> None:
        with open(f"{self.state_path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.state_path.read_text())
            state.update(changes)
            self.state_path.write_text(json.dumps(state))

    @property
    def calls(self) -> list[list[str]]:
        return json.loads(self.state_path.read_text())["calls"]

    def repro_calls(self) -> list[list[str]]:
        """The stages of each `dvc repro` call."""
        return [[arg for arg in call[1:] if not arg.startswith("--")] for call in self.calls if call[0] == "repro"]


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch) -> FakeDvc:
    script = tmp_path / "fake_dvc.py"
    script.write_text(FAKE_DVC)
    state = tmp_path / "fake_dvc_state.json"
    # nodes listed out of order: the flow must order them from the edges
    state.write_text(
        json.dumps(
            {
                "nodes": ["report", "evaluate", "fetch", "train", "split", "preprocess"],
                "edges": EDGES,
                "calls": [],
                "failures": {},
                "up_to_date": [],
                "metrics": {},
                "params": {},
            }
        )
    )
    monkeypatch.setattr(dvc, "DVC_COMMAND", (sys.executable, str(script)))
    monkeypatch.setenv("FAKE_DVC_STATE", str(state))
    # retries without the waits
    monkeypatch.setattr(tasks, "reproduce_stage", tasks.reproduce_stage.with_options(retry_delay_seconds=0))
    return FakeDvc(state)


@pytest.fixture
def fake_project(tmp_path) -> Path:
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    return project


def flow_logs(flow_run_id) -> str:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def artifact(flow_run_id, key: str, wait_s: float = 30):
    """The flow run's artifact `key`, waiting up to wait_s for the API to show it (None if it never does):
    with both cores busy, the test harness's server has answered before it stored one the flow just wrote."""
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
            if found or time.monotonic() > deadline:
                return found[0] if found else None
            time.sleep(0.2)


# --- the flow, with the fake dvc ----------------------------------------------------------


def test_stages_run_in_dag_order_in_one_dvc_process_one_task_each(fake_dvc, fake_project):
    state = dvc_pipeline(project_dir=str(fake_project), return_state=True)
    assert fake_dvc.repro_calls() == [STAGES]  # one DVC start for the six stages
    assert all(call[-1] == "--single-item" for call in fake_dvc.calls if call[0] == "repro")
    result = state.result()
    assert result["stages"] == {stage: "ran" for stage in STAGES}
    assert result["experiment"] is None  # no overrides: like `dvc repro`, no experiment
    logs = flow_logs(state.state_details.flow_run_id)
    for stage in STAGES:  # each task logged its own stage's output, and only that
        assert f"stage '{stage}': ran" in logs
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert sorted(run.name for run in runs if run.name in STAGES) == sorted(STAGES)


def test_stage_targets_bring_their_upstream(fake_dvc, fake_project):
    dvc_pipeline(project_dir=str(fake_project), stages=["train"])
    assert fake_dvc.repro_calls() == [["fetch", "split", "preprocess", "train"]]


def test_unknown_stage_is_named(fake_dvc, fake_project):
    with pytest.raises(UnknownStage, match="'trian'.*fetch, split"):
        dvc_pipeline(project_dir=str(fake_project), stages=["trian"])
    assert fake_dvc.repro_calls() == []


def test_stops_at_the_first_failing_stage_with_its_message(fake_dvc, fake_project):
    fake_dvc.set(failures={"split": [{"output": BAD_PARAMS}]})
    state = dvc_pipeline(project_dir=str(fake_project), return_state=True)
    assert state.is_failed()
    with pytest.raises(dvc.StageFailed) as failed:
        state.result()
    assert failed.value.stage == "split"
    assert not isinstance(failed.value, dvc.TransientStageError)
    assert "split.train_size: Input should be greater than 0" in str(failed.value)
    assert fake_dvc.repro_calls() == [STAGES]  # not retried, nothing after it
    logs = flow_logs(state.state_details.flow_run_id)
    assert "error: invalid parameters\nsplit.train_size: Input should be greater than 0" in logs
    assert "stage 'fetch': ran" in logs and "stage 'preprocess'" not in logs


def test_a_held_lock_is_retried(fake_dvc, fake_project):
    fake_dvc.set(failures={"fetch": [{"output": LOCKED}, {"output": LOCKED}]})
    result = dvc_pipeline(project_dir=str(fake_project))
    assert fake_dvc.repro_calls() == [STAGES] * 3
    assert result["stages"]["fetch"] == "ran"


def test_a_retry_in_mid_pipeline_starts_dvc_again_at_that_stage(fake_dvc, fake_project):
    fake_dvc.set(failures={"preprocess": [{"output": NETWORK.replace("'fetch'", "'preprocess'")}]})
    result = dvc_pipeline(project_dir=str(fake_project))
    assert fake_dvc.repro_calls() == [STAGES, STAGES[2:]]
    assert result["stages"] == {stage: "ran" for stage in STAGES}


def test_network_errors_are_retried_then_fail_with_the_message(fake_dvc, fake_project):
    fake_dvc.set(failures={"fetch": [{"output": NETWORK}] * 10})
    with pytest.raises(dvc.TransientStageError, match="could not download .* after 4 tries"):
        dvc_pipeline(project_dir=str(fake_project))
    assert fake_dvc.repro_calls() == [STAGES] * (1 + tasks.STAGE_RETRIES)


def test_bad_params_are_not_retried_even_with_a_lock_message(fake_dvc, fake_project):
    fake_dvc.set(failures={"fetch": [{"output": BAD_PARAMS + "\n" + LOCKED}] * 5})
    with pytest.raises(dvc.StageFailed):
        dvc_pipeline(project_dir=str(fake_project))
    assert fake_dvc.repro_calls() == [STAGES]


def test_up_to_date_stages_are_dvcs_call(fake_dvc, fake_project):
    fake_dvc.set(up_to_date=["fetch", "split", "preprocess"])
    result = dvc_pipeline(project_dir=str(fake_project), experiment=True)
    # DVC was asked about every stage: Prefect's cache never skipped one
    assert fake_dvc.repro_calls() == [STAGES]
    assert [result["stages"][s] for s in STAGES] == ["skipped"] * 3 + ["ran"] * 3
    assert result["experiment"] == "fake-exp"
    assert ["exp", "save"] in fake_dvc.calls


def test_a_retried_flow_asks_dvc_again_for_every_stage(fake_dvc, fake_project):
    """Prefect's task cache (same flow run, same inputs) must not stand in for DVC."""
    fake_dvc.set(failures={"report": [{"output": "error: disk full"}]})
    result = dvc_pipeline.with_options(retries=1, retry_delay_seconds=0)(project_dir=str(fake_project))
    assert fake_dvc.repro_calls() == [STAGES, STAGES]
    assert result["stages"]["report"] == "ran"


def test_no_experiment_when_nothing_ran(fake_dvc, fake_project):
    fake_dvc.set(up_to_date=STAGES)
    result = dvc_pipeline(project_dir=str(fake_project), experiment=True)
    assert result["experiment"] is None
    assert not any(call[:2] == ["exp", "save"] for call in fake_dvc.calls)


def test_artifacts_compare_metrics_with_the_baseline_and_inline_the_plots(fake_dvc, fake_project):
    fake_dvc.set(
        metrics={"data/eval/metrics.json": {"test.accuracy": {"old": 0.5, "new": 0.75, "diff": 0.25}}},
        params={"params.yaml": {"train.epochs": {"old": 10, "new": 1, "diff": -9}}},
    )
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    (fake_project / "data/report").mkdir(parents=True)
    (fake_project / "data/report/loss.png").write_bytes(png)
    state = dvc_pipeline(project_dir=str(fake_project), return_state=True)
    run_id = state.state_details.flow_run_id

    table = artifact(run_id, "dvc-metrics")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows == [
        {
            "file": "data/eval/metrics.json",
            "metric": "test.accuracy",
            "baseline": "0.5",
            "this run": "0.75",
            "change": "0.25",
        }
    ]
    markdown = artifact(run_id, "dvc-report").data
    assert "| train.epochs | 10 | 1 |" in markdown
    inlined = markdown.split("data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(inlined) == png


# --- pure parts ---------------------------------------------------------------------------


def test_parse_dot_orders_by_edges_and_keeps_dvc_yaml_order_for_ties():
    text = 'strict digraph {\n"b";\n"a";\n"c";\n"a" -> "c";\n"b" -> "c";\n}\n'
    graph = parse_dot(text)
    assert graph.order == ("b", "a", "c")
    assert graph.predecessors("c") == ["b", "a"]
    assert graph.plan(["c"], single_item=True) == ["c"]


def test_a_cycle_is_refused():
    with pytest.raises(ValueError, match="cycle"):
        parse_dot('"a" -> "b";\n"b" -> "a";\n')


def test_plan_of_several_targets():
    graph = StageGraph(tuple(STAGES), frozenset(EDGES))
    assert graph.plan(["split", "train"]) == ["fetch", "split", "preprocess", "train"]
    assert graph.ancestors("evaluate") == {"fetch", "split", "preprocess", "train"}


def test_failure_message_is_the_stages_own_then_dvcs():
    run = dvc.DvcRun(("repro",), 1, tuple(BAD_PARAMS.splitlines()))
    message = dvc.failure_message(run.tail)
    assert message.splitlines()[:2] == ["error: invalid parameters", "split.train_size: Input should be greater than 0"]
    assert message.splitlines()[-1].startswith("ERROR: failed to reproduce 'split'")
    assert "Running stage" not in message


def test_failure_without_an_error_line_keeps_the_last_lines():
    lines = [f"line {i}" for i in range(40)] + ["Traceback ...", "KeyError: 'x'", "ERROR: failed to reproduce 'train'"]
    message = dvc.failure_message(lines)
    assert "KeyError: 'x'" in message and "line 0" not in message


def test_transient_patterns():
    def kind(output: str) -> type:
        return type(dvc.stage_failure("fetch", dvc.DvcRun((), 1, tuple(output.splitlines()))))

    assert kind(LOCKED) is dvc.TransientStageError
    assert kind(NETWORK) is dvc.TransientStageError
    assert kind("error: could not download https://x/y.zip: HTTP 503 Service Unavailable") is dvc.TransientStageError
    assert kind("error: could not download https://x/y.zip: HTTP 404 Not Found") is dvc.StageFailed
    assert kind("error: fetch.archive data.zip not found") is dvc.StageFailed


def test_stage_outcome():
    assert dvc.stage_outcome("train", ["Running stage 'train':"]) == "ran"
    assert dvc.stage_outcome("train", ["Stage 'train' is cached - skipping run, checking out outputs"]) == "restored"
    assert dvc.stage_outcome("train", ["Stage 'train' didn't change, skipping"]) == "skipped"


def has_ended(pid: int, within_s: float = 5.0) -> bool:
    """True once `pid` is gone, or a zombie waiting for a parent to reap it (it runs no more)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_run_dvc_stops_a_stage_that_must_not_run_here(monkeypatch, tmp_path):
    """DVC and the stage command it started are both stopped, not left to run."""
    script = tmp_path / "slow.py"
    pid_file = tmp_path / "pids"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "stage = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{stage.pid}}')\n"
        "print(\"Running stage 'train':\", flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(dvc, "DVC_COMMAND", (sys.executable, str(script)))
    started = time.monotonic()
    with pytest.raises(dvc.StageRanLocally):
        dvc.run_dvc(tmp_path, [], stop_on=dvc.starts_running("train"))
    assert time.monotonic() - started < 30  # stopped, not waited for
    dvc_pid, stage_pid = map(int, pid_file.read_text().split())
    assert has_ended(dvc_pid) and has_ended(stage_pid)


def test_fetch_errors_are_transient_only_when_fetch_retried():
    """convnets.downloads says "after N tries" only of a transient error it retried (test_data_fetch runs it)."""

    def kind(error: str) -> type:
        lines = ("Running stage 'fetch':", error, "ERROR: failed to reproduce 'fetch': exited with 1")
        return type(dvc.stage_failure("fetch", dvc.DvcRun((), 1, lines)))

    assert kind("error: could not download file:///data/train.zip: the file does not exist") is dvc.StageFailed
    assert kind("error: could not download file:///data: [Errno 21] Is a directory: '/data'") is dvc.StageFailed
    assert kind("error: could not download https://x/y.zip after 5 tries: got 10 of 20 bytes") is (
        dvc.TransientStageError
    )


def test_a_repro_run_that_starts_a_stage_it_must_restore_is_stopped(monkeypatch, tmp_path):
    script = tmp_path / "slow.py"
    pid_file = tmp_path / "pid"
    script.write_text(
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print(' '.join(sys.argv[1:]), flush=True)\n"
        "print(\"Running stage 'train':\", flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(dvc, "DVC_COMMAND", (sys.executable, str(script)))
    started = time.monotonic()
    lines: list[str] = []
    with dvc.ReproRun(tmp_path, ["train"], pull=True) as repro, pytest.raises(dvc.StageRanLocally):
        repro.stage("train", on_line=lines.append, stop_on=dvc.starts_running("train"))
    assert lines[0] == "repro train --single-item --pull"
    assert time.monotonic() - started < 30  # stopped, not waited for
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_leaving_a_repro_run_stops_the_dvc_still_running(monkeypatch, tmp_path):
    """A flow cancelled between two stages leaves no DVC (nor the stage it started) behind."""
    script = tmp_path / "slow.py"
    pid_file = tmp_path / "pid"
    script.write_text(
        "import os, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print(\"Running stage 'a':\", flush=True)\n"
        "print(\"Running stage 'b':\", flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(dvc, "DVC_COMMAND", (sys.executable, str(script)))
    with pytest.raises(RuntimeError), dvc.ReproRun(tmp_path, ["a", "b"]) as repro:
        assert repro.stage("a").tail == ("Running stage 'a':",)  # returns at b's first line
        raise RuntimeError("the flow was cancelled")
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_metrics_rows_show_missing_baseline_as_dash():
    rows = artifacts.metrics_rows({"m.json": {"acc": {"old": None, "new": 0.123456}}})
    assert rows == [{"file": "m.json", "metric": "acc", "baseline": "-", "this run": "0.1235", "change": "-"}]


# --- the remote round trip's checks -------------------------------------------------------


def commit_all(project: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "x"], cwd=project, check=True, env=env)


def test_uncommitted_code_blocks_sending_but_params_and_lock_travel(fake_project, tmp_path):
    for name in ("params.yaml", "dvc.lock", "dvc.yaml"):
        (fake_project / name).write_text("a: 1\n")
    (fake_project / "conf").mkdir()
    (fake_project / "conf/config.yaml").write_text("a: 1\n")
    commit_all(fake_project)
    with pytest.raises(remote.RemoteStageError, match="not on 'origin'.*git push"):
        remote.check_can_send(fake_project)  # a worker could not check the commit out
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], cwd=fake_project, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=fake_project, check=True)
    subprocess.run(["git", "fetch", "-q", "origin"], cwd=fake_project, check=True)
    for name in ("params.yaml", "dvc.lock", "conf/config.yaml"):
        (fake_project / name).write_text("a: 2\n")
    assert remote.check_can_send(fake_project) == remote.head_commit(fake_project)
    assert remote.uncommitted_changes(fake_project) == ["conf/config.yaml", "params.yaml"]  # a sweep runs conf/
    assert remote.uncommitted_changes(fake_project, composed=("params.yaml",)) == ["conf/config.yaml"]
    (fake_project / "dvc.yaml").write_text("a: 2\n")
    with pytest.raises(remote.RemoteStageError, match="uncommitted changes to dvc.yaml"):
        remote.check_can_send(fake_project)


def test_worker_takes_only_the_shipped_files(fake_project):
    (fake_project / "dvc.lock").write_text("old\n")
    remote.write_shipped_files(fake_project, {"params.yaml": "p: 1\n", "dvc.lock": None})
    assert (fake_project / "params.yaml").read_text() == "p: 1\n"
    assert not (fake_project / "dvc.lock").exists()
    with pytest.raises(remote.RemoteStageError, match="refusing"):
        remote.write_shipped_files(fake_project, {"../evil": "x"})


def test_flow_runs_start_in_the_work_folder_not_a_checkout(monkeypatch, tmp_path):
    from pipeline import workspace

    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    assert workspace.enter_work_folder() == {"directory": str(tmp_path / "runs")}
    assert (tmp_path / "runs").is_dir()
    monkeypatch.delenv(workspace.WORK_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert workspace.enter_work_folder()["directory"] == str(tmp_path / "cache" / "convnets" / "runs")


def test_remote_target_needs_the_deployment_and_its_pool():
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipeline.flows import dvc_stage

    name = "dvc-stage/units-gpu"
    assert remote.find_remote_target(name) is None
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="units-gpu", type="process"))
        flow_id = client.create_flow(dvc_stage)
        client.create_deployment(
            flow_id=flow_id, name="units-gpu", work_pool_name="units-gpu", entrypoint="pipeline.flows.dvc_stage"
        )
    target = remote.find_remote_target(name)
    assert target == remote.RemoteTarget(name, "units-gpu", pool_ready=False)
    with get_client(sync_client=True) as client:
        client.delete_work_pool("units-gpu")
    assert remote.find_remote_target(name) is None


# --- the flow with the real dvc, tiny params ------------------------------------------------

TINY = ["train.epochs=1", "split.train_size=300", "split.val_size=100", "split.test_size=100"]


def real_dvc(project: Path, *args: str) -> str:
    proc = subprocess.run([*dvc.DVC_COMMAND, *args], cwd=project, env=dvc.dvc_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def experiments(project: Path) -> dict[str, dict]:
    """name -> params.yaml of each experiment `dvc exp show` lists."""
    found = {}
    for commit in json.loads(real_dvc(project, "exp", "show", "--json")):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                found[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]
    return found


@pytest.mark.slow
def test_real_dvc_bad_params_fail_once_then_a_run_is_an_experiment_and_a_rerun_does_nothing(project_copy, monkeypatch):
    project = project_copy
    monkeypatch.setenv("PYTHONPATH", str(project / "src"))  # the stages run this copy's code
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")

    bad = dvc_pipeline(project_dir=str(project), overrides=[*TINY, "split.train_size=0"], return_state=True)
    with pytest.raises(dvc.StageFailed, match="(?s)invalid parameters.*train_size") as failed:
        bad.result()
    # every stage validates the whole params.yaml, so the first one stops the run
    assert failed.value.stage == "fetch" and not isinstance(failed.value, dvc.TransientStageError)
    assert flow_logs(bad.state_details.flow_run_id).count("Running stage 'fetch'") == 1  # no retry
    assert not (project / "data/raw").exists()

    first_state = dvc_pipeline(project_dir=str(project), overrides=TINY, return_state=True)
    first = first_state.result()
    assert first["stages"] == {s: "ran" for s in STAGES}
    assert experiments(project)[first["experiment"]]["train"]["epochs"] == 1
    # the experiments of the commit, side by side (convnets.compare), as a table and a charts artifact
    board = artifact(first_state.state_details.flow_run_id, "dvc-leaderboard")
    rows = json.loads(board.data) if isinstance(board.data, str) else board.data
    assert [row["experiment"] for row in rows] == [first["experiment"]]
    charts = artifact(first_state.state_details.flow_run_id, "dvc-experiment-charts")
    assert "data:image/png;base64," in charts.data
    outputs = sorted(p for p in (project / "data").rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in outputs}

    second = dvc_pipeline(project_dir=str(project), overrides=TINY)
    assert second["stages"] == {s: "skipped" for s in STAGES}
    assert second["experiment"] is None
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert list(experiments(project)) == [first["experiment"]]
    assert json.loads(real_dvc(project, "status", "--json")) == {}


# --- sweeps: the parts that need a Prefect API ---------------------------------------------------


def bare_origin_with_a_commit(tmp_path: Path) -> tuple[Path, str]:
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(origin), str(work)], check=True, capture_output=True)
    (work / "f").write_text("x")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "add", "f"], cwd=work, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "x"], cwd=work, check=True, env=env)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=work, check=True)
    return origin, subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_sweep_with_no_worker_on_its_pool_gives_up_after_the_timeout(tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipeline import sweep
    from pipeline.flows import dvc_experiment
    from pipeline.grid import Point, SweepError
    from pipeline.results import Target

    origin, commit = bare_origin_with_a_commit(tmp_path)
    target = Target(str(origin), commit, None, "units-sweep")
    with pytest.raises(SweepError, match="no work pool 'units-sweep'.*prefect work-pool create units-sweep"):
        sweep.run_points(dvc_experiment, [Point(("seed=1",), "a")], target, {}, [], timeout_s=1, retries=0, log=print)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="units-sweep", type="process"))
    started = time.monotonic()
    (outcome,) = sweep.run_points(
        dvc_experiment, [Point(("seed=1",), "a")], target, {}, [], timeout_s=3, retries=0, log=print
    )
    assert time.monotonic() - started < 60
    assert outcome.status == "no worker"
    assert (
        "no worker polled pool 'units-sweep' for 3 s: start one with `prefect worker start --pool units-sweep"
        in outcome.message
    )
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(outcome.flow_run_id).state.type.value == "CANCELLED"  # not left waiting
        deployment = client.read_deployment_by_name("dvc-experiment/units-sweep")
        assert deployment.pull_steps == [{"pipeline.workspace.enter_work_folder": {}}]


def test_a_sweep_with_failed_experiments_prints_the_table_and_exits_non_zero(
    project_copy, tmp_path, monkeypatch, capsys
):
    from pipeline import results, sweep
    from pipeline.__main__ import main

    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=project_copy, check=True)
    subprocess.run(["git", "push", "-q", "-u", "origin", "main"], cwd=project_copy, check=True, capture_output=True)

    def run_points(flow, points, target, groups, data_stages, timeout_s, retries, log, data_pool=None, bounds=None):
        assert (
            [p.name for p in points] == ["t-seed-1", "t-seed-2"] and target.commit and data_stages[-1] == "preprocess"
        )
        return [
            results.Outcome(points[0], status="failed", message="stage 'train' failed: error: out of memory"),
            results.Outcome(points[1], status="no worker", message="no worker polled pool 'gpu' for 5 s"),
        ]

    monkeypatch.setattr(sweep, "run_points", run_points)
    assert main(["sweep", "-S", "seed=1,2", "--name-prefix", "t", "--project", str(project_copy)]) == 1
    out, err = capsys.readouterr()
    assert "t-seed-1" in out and "failed: stage 'train' failed: error: out of memory" in out
    assert "error: 2 experiment(s) failed: t-seed-1 (failed); t-seed-2 (no worker)" in err


def test_a_sweep_with_an_unknown_key_names_it_and_submits_nothing(project_copy, monkeypatch, capsys):
    from pipeline import sweep
    from pipeline.__main__ import main

    monkeypatch.setattr(sweep, "run_points", lambda *a, **k: pytest.fail("submitted"))
    assert main(["sweep", "-S", "train.nope=1,2", "--project", str(project_copy)]) == 2
    err = capsys.readouterr().err
    assert "Could not override 'train.nope'" in err and len(err.strip().splitlines()) == 1


def test_a_stage_that_may_go_to_a_worker_gets_a_dvc_run_of_its_own():
    from pipeline.flows import local_runs

    worker = object()
    assert local_runs(STAGES, {}) == [STAGES]
    assert local_runs(STAGES, {"train": worker, "fetch": None}) == [STAGES[:3], ["train"], STAGES[4:]]
    assert local_runs(["train", "evaluate"], {"train": worker}) == [["train"], ["evaluate"]]


def test_stage_started_reads_the_line_dvc_starts_each_stage_with():
    assert dvc.stage_started("Running stage 'train':") == "train"
    assert dvc.stage_started("Stage 'split' didn't change, skipping") == "split"
    assert dvc.stage_started("Stage 'train' is cached - skipping run, checking out outputs") == "train"
    assert dvc.stage_started("'data.dvc' didn't change, skipping") == "data.dvc"
    assert dvc.stage_started("Pulling data for stage: 'evaluate'") == "evaluate"
    assert dvc.stage_started("train: epoch 3 of 'train' done") is None
    assert dvc.stage_started("Updating lock file 'dvc.lock'") is None


def test_a_sweep_whose_fetch_reads_a_path_only_this_machine_has_names_it_and_submits_nothing(
    project_copy, tmp_path, monkeypatch, capsys
):
    from pipeline import sweep
    from pipeline.__main__ import main

    # pushed, so that nothing but the path stops it
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=project_copy, check=True)
    subprocess.run(["git", "push", "-q", "-u", "origin", "main"], cwd=project_copy, check=True, capture_output=True)
    monkeypatch.setattr(sweep, "run_points", lambda *a, **k: pytest.fail("submitted"))
    assert main(["sweep", "-S", "dataset=dogs_vs_cats", "-S", "seed=1,2", "--project", str(project_copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "fetch.archive '../shared/data/dogs-vs-cats-128/dogs-vs-cats.zip' is a path relative" in err
    assert "use an http(s) URL, fetch.source=kaggle, or an absolute path that every worker has" in err
    with get_client(sync_client=True) as client:
        assert not [d for d in client.read_deployments() if d.name == "gpu"]  # no dvc-experiment/gpu either


# --- one run per point, whatever is rerun --------------------------------------------------------


def live_runs_by_name(names: list[str]) -> dict[str, int]:
    """How many flow runs of each name have not ended."""
    from prefect.client.schemas.filters import FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    return {name: sum(r.name == name and not r.state.is_final() for r in runs) for name in names}


def pool_target(tmp_path: Path, pool: str, heartbeat_s: int | None = None):
    """A work pool nobody polls (its runs' heartbeat period set in its base job template), and a
    Target of a pushed commit on it."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from pipeline.results import Target

    template = ProcessWorker.get_default_base_job_template()
    if heartbeat_s is not None:
        template["variables"]["properties"]["env"]["default"] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
    origin, commit = bare_origin_with_a_commit(tmp_path)
    return Target(str(origin), commit, None, pool)


def test_a_sweep_interrupted_after_submission_and_run_again_waits_for_the_same_runs(tmp_path):
    """Ctrl-C once the points are submitted, then the same sweep again: one live run per point, not two."""
    from pipeline import sweep
    from pipeline.flows import dvc_experiment
    from pipeline.grid import Point

    target = pool_target(tmp_path, "units-rerun")
    points = [Point(("seed=1",), "rerun-a"), Point(("seed=2",), "rerun-b")]

    def ctrl_c_once_submitted(line: str) -> None:
        if line.startswith("submitted"):
            raise KeyboardInterrupt

    with pytest.raises(BaseException) as interrupted:
        sweep.run_points(dvc_experiment, points, target, {}, [], timeout_s=60, retries=0, log=ctrl_c_once_submitted)
    live: list[dict[str, int]] = []

    def count_once_submitted(line: str) -> None:
        if line.startswith("submitted"):
            live.append(live_runs_by_name(["rerun-a", "rerun-b"]))

    outcomes = sweep.run_points(
        dvc_experiment, points, target, {}, [], timeout_s=2, retries=0, log=count_once_submitted
    )
    assert live == [{"rerun-a": 1, "rerun-b": 1}]
    assert [o.status for o in outcomes] == ["no worker", "no worker"]  # then it gave up, as before
    # what Ctrl-C said, in one line: which runs go on, how to wait for them, how to cancel them
    message = str(interrupted.value)
    assert isinstance(interrupted.value, sweep.SweepInterrupted) and "\n" not in message
    assert message.startswith("interrupted: 2 flow run(s) go on: rerun-a (")
    assert f"rerun-b ({outcomes[1].flow_run_id})" in message
    assert "the same command again waits for them, and with --cancel cancels them" in message
    assert "`prefect flow-run cancel <id>`" in message


def test_cancel_stops_the_runs_of_a_sweep_that_have_not_ended(tmp_path):
    from pipeline import sweep
    from pipeline.flows import dvc_experiment
    from pipeline.grid import Point

    target = pool_target(tmp_path, "units-cancel")
    points = [Point(("seed=1",), "cancel-a"), Point(("seed=2",), "cancel-b")]

    def ctrl_c_once_submitted(line: str) -> None:
        if line.startswith("submitted"):
            raise KeyboardInterrupt

    with pytest.raises(sweep.SweepInterrupted):
        sweep.run_points(dvc_experiment, points, target, {}, [], timeout_s=60, retries=0, log=ctrl_c_once_submitted)
    assert live_runs_by_name(["cancel-a", "cancel-b"]) == {"cancel-a": 1, "cancel-b": 1}
    assert sorted(sweep.cancel_runs(points[:1], target, {})) == ["cancel-a"]
    assert live_runs_by_name(["cancel-a", "cancel-b"]) == {"cancel-a": 0, "cancel-b": 1}


def crash_windows(deployment_id) -> list[float]:
    """The windows of the crash automations that watch the runs of this deployment, in seconds."""
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
    windows = []
    for automation in automations:
        if not automation.name.startswith("convnets: mark silent"):
            continue
        related = automation.trigger.match_related
        related = related if isinstance(related, list) else [related]
        watched = [
            spec
            for spec in related
            if spec.get("prefect.resource.name") in ("dvc-experiment", ["dvc-experiment"])
            or f"prefect.deployment.{deployment_id}" in str(spec.get("prefect.resource.id"))
        ]
        if watched:
            windows.append(automation.trigger.within.total_seconds())
    return windows


def test_the_crash_window_follows_the_heartbeat_of_the_pools_runs_not_the_submitters(tmp_path):
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from pipeline import sweep
    from pipeline.flows import dvc_experiment
    from pipeline.grid import Point

    target = pool_target(tmp_path, "units-heartbeat", heartbeat_s=60)
    point = Point(("seed=1",), "heartbeat-a")
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):  # the submitting machine's own setting
        sweep.run_points(dvc_experiment, [point], target, {}, [], timeout_s=1, retries=0, log=print)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dvc-experiment/units-heartbeat")
    # the runs beat every 60 s, whatever their worker's own environment says, and 3 silent beats make a crash
    assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    assert crash_windows(deployment.id) == [180]

    # the pool's heartbeat changes: the window follows, and stays the only one
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("units-heartbeat")
        template = pool.base_job_template
        template["variables"]["properties"]["env"]["default"] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "90"}
        client.update_work_pool("units-heartbeat", WorkPoolUpdate(base_job_template=template))
    sweep.run_points(dvc_experiment, [point], target, {}, [], timeout_s=1, retries=0, log=print)
    assert crash_windows(deployment.id) == [270]


def test_a_point_whose_refs_are_home_without_its_outputs_runs_again_and_replaces_them(tmp_path, monkeypatch):
    """Refs in the git remote, outputs not in the DVC remote (a push the DVC remote refused): not done."""
    from test_sweep_units import dvc, toy_dvc_origin

    from pipeline import experiment, sweep, workspace
    from pipeline.flows import dvc_experiment
    from pipeline.grid import Point
    from pipeline.results import Target

    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.DVC_CACHE_ENV, str(tmp_path / "dvc-cache"))
    pool_target(tmp_path, "units-half-pushed")
    origin, commit = toy_dvc_origin(tmp_path)
    target = Target(origin, commit, str(tmp_path / "dvc-remote"), "units-half-pushed")
    with workspace.clean_checkout(origin, commit, "half") as clone:
        experiment.configure_dvc(clone, target.dvc_remote)
        dvc(clone, "exp", "run", "-n", "half-pushed")
        dvc(clone, "exp", "push", "--no-cache", "origin", "half-pushed")
        (outcome,) = sweep.run_points(
            dvc_experiment, [Point((), "half-pushed")], target, {}, [], timeout_s=1, retries=0, log=print
        )
        assert outcome.status == "no worker"  # submitted again, not "already done"
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(outcome.flow_run_id).parameters["replace"] is True
        dvc(clone, "push")  # now its outputs are home too
    (outcome,) = sweep.run_points(
        dvc_experiment, [Point((), "half-pushed")], target, {}, [], timeout_s=1, retries=0, log=print
    )
    assert outcome.status == "already done"
