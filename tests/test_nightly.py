"""The nightly flow (`dvc_nightly`) against a temporary Prefect API, with the worker side faked.

The real sweep machinery runs (sweep.run_points submits `dvc-experiment` flow runs, waiting.wait_for
polls them, sweep.read_summaries reads their figures); what a worker would do is faked at the edges:
the git remote's experiments are a set, and each submitted flow run is ended (Completed or Crashed)
by the test, with the table artifact a real experiment run publishes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import pytest

# Prefect reads PREFECT_HOME when first imported (and creates it): a throw-away folder, never ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="convnets-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.states import Completed, Crashed  # noqa: E402
from prefect_fleet import seeded_test_harness  # noqa: E402

from pipeline import nightly, remote, sweep, waiting  # noqa: E402
from pipeline.flows import dvc_nightly  # noqa: E402
from pipeline.prefect_api import artifact_key, latest_table  # noqa: E402
from pipeline.results import ExperimentsFailed  # noqa: E402

POOL = "nightly-units"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DOGS = ["dataset=dogs_vs_cats"]
ACCURACY = {(): 0.99, tuple(DOGS): 0.71}  # what a worker's experiment reaches, by overrides
SUBMIT = sweep.submit  # the real one: a scheduled flow run of the dvc-experiment deployment


@pytest.fixture(scope="module")
def prefect_api(prefect_database):
    """One temporary Prefect API for the flow tests of this module (the name tests need none)."""
    from prefect.client.schemas.actions import WorkPoolCreate

    with seeded_test_harness(prefect_database):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        yield


class FakeWorkers:
    """The worker side of the experiment runs: the first `crashes` submissions crash (their worker
    died), the others train, publish their figures and push their experiment to the git remote."""

    def __init__(self, crashes: int = 0):
        self.crashes = crashes
        self.on_remote: set[str] = set()
        self.submitted: list[str] = []
        self.trained: list[str] = []

    def submit(self, deployment, target, point, **kwargs):
        flow_run_id = SUBMIT(deployment, target, point, **kwargs)
        self.submitted.append(point.name)
        if len(self.submitted) <= self.crashes:
            end(flow_run_id, Crashed(message="no heartbeat for 90 s: its worker stopped"))
            return flow_run_id
        publish_figures(target.commit, point.name, ACCURACY[point.overrides])
        self.on_remote.add(point.name)
        self.trained.append(point.name)
        end(flow_run_id, Completed())
        return flow_run_id


def end(flow_run_id, state) -> None:
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, state, force=True)


def publish_figures(commit: str, name: str, accuracy: float) -> None:
    """The table artifact dvc_experiment publishes, which sweep.read_summaries reads."""
    key = artifact_key("experiment", commit[:7], name)
    create_table_artifact(
        key=key, table=[{"worker": "fake", "test_accuracy": accuracy, "roc_auc": accuracy, "best_epoch": 2}]
    )
    wait_for_table(key, lambda rows: rows and rows[0]["test_accuracy"] == accuracy)


def wait_for_table(key: str, ready, wait_s: float = 30) -> list[dict]:
    """The newest version of table `key` once `ready(rows)`: with both cores busy, the test API has
    been seen to answer before it stored an artifact just written."""
    deadline = time.monotonic() + wait_s
    while not ready(rows := latest_table(key)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows


@pytest.fixture
def workers(prefect_api, monkeypatch) -> FakeWorkers:
    fake = FakeWorkers()
    monkeypatch.setattr(sweep, "submit", fake.submit)
    monkeypatch.setattr(sweep, "experiments_on_remote", lambda repository, commit: set(fake.on_remote))
    monkeypatch.setattr(sweep, "ensure_crash_detection", lambda heartbeat_s: None)
    monkeypatch.setattr(nightly, "check_before_submitting", lambda point, repository, commit: None)
    monkeypatch.setattr(remote, "branch_head", lambda repository, branch: COMMIT)
    monkeypatch.setattr(waiting, "POLL_S", 0.1)
    return fake


def run_nightly(branch: str, overrides: list[str] | None = None) -> dict:
    result = dvc_nightly(
        branch=branch, pool=POOL, repository="origin-unused", dvc_remote="remote-unused", overrides=overrides, timeout=5
    )
    # the next nightly reads this one's table: wait until the API shows it
    wait_for_table(nightly.artifact_key(branch, overrides), lambda rows: rows and rows[0]["value"] == COMMIT)
    return result


def reported(branch: str, overrides: list[str] | None = None) -> dict:
    """metric -> this run's value, from the nightly's table artifact."""
    return {row["metric"]: row["value"] for row in latest_table(nightly.artifact_key(branch, overrides))}


# --- names and keys ----------------------------------------------------------------------------


def test_a_default_nightly_keeps_its_names():
    assert nightly.experiment_name(COMMIT, []) == "nightly-0123456"
    assert nightly.artifact_key("main", []) == "nightly-main-metrics"
    assert nightly.artifact_key("main", None, "note") == "nightly-main-note"


def test_a_nightly_with_overrides_is_named_and_keyed_by_them_in_any_order():
    two = ["dataset=dogs_vs_cats", "seed=2"]
    name = nightly.experiment_name(COMMIT, two)
    assert name.startswith("nightly-0123456-") and name != nightly.experiment_name(COMMIT, [])
    assert name == nightly.experiment_name(COMMIT, list(reversed(two)))
    assert name != nightly.experiment_name(COMMIT, ["dataset=dogs_vs_cats", "seed=3"])
    assert nightly.artifact_key("main", two) == nightly.artifact_key("main", list(reversed(two)))
    assert nightly.artifact_key("main", two) not in {nightly.artifact_key("main", []), nightly.artifact_key("dev", two)}


def test_overrides_of_one_key_keep_their_order_on_which_their_value_depends():
    one_then_two = nightly.experiment_name(COMMIT, ["seed=1", "seed=2"])
    assert one_then_two != nightly.experiment_name(COMMIT, ["seed=2", "seed=1"])


# --- the flow ------------------------------------------------------------------------------------


def test_a_nightly_with_overrides_after_a_default_one_trains_and_reports_its_own_figures(workers):
    assert run_nightly("same-commit")["status"] == "done"
    dogs = run_nightly("same-commit", DOGS)
    assert dogs["status"] == "done", dogs  # not "unchanged": the default run trained another experiment
    assert workers.trained == [nightly.experiment_name(COMMIT, []), nightly.experiment_name(COMMIT, DOGS)]
    assert reported("same-commit", DOGS)["test_accuracy"] == ACCURACY[tuple(DOGS)]
    assert reported("same-commit")["test_accuracy"] == ACCURACY[()]  # the default's table is its own


def test_a_nightly_with_overrides_on_another_branch_at_the_same_commit_is_its_own_experiment(workers):
    run_nightly("branch-a")
    dogs = run_nightly("branch-b", DOGS)
    assert reported("branch-b", DOGS)["test_accuracy"] == ACCURACY[tuple(DOGS)]  # not MNIST's, "already done"
    assert dogs["experiment"] != nightly.experiment_name(COMMIT, [])


def test_the_same_nightly_again_trains_nothing(workers):
    run_nightly("again", DOGS)
    assert run_nightly("again", DOGS)["status"] == "unchanged"
    assert workers.trained == [nightly.experiment_name(COMMIT, DOGS)]


def test_a_crashed_nightly_run_is_submitted_again(workers):
    workers.crashes = 1
    result = run_nightly("crash-once")
    assert result["status"] == "done"
    assert workers.submitted == [result["experiment"]] * 2 and workers.trained == [result["experiment"]]
    assert reported("crash-once")["test_accuracy"] == ACCURACY[()]


def test_a_nightly_whose_runs_all_crashed_runs_again_the_next_night(workers):
    workers.crashes = sweep.DEFAULT_RETRIES + 1
    with pytest.raises(ExperimentsFailed, match="crashed"):
        dvc_nightly(branch="crash-always", pool=POOL, repository="o", dvc_remote="r", timeout=5)
    assert wait_for_table(nightly.artifact_key("crash-always", None), bool)
    assert run_nightly("crash-always")["status"] == "done"  # same commit, but the last one never finished
    assert len(workers.submitted) == sweep.DEFAULT_RETRIES + 2
