"""One leaderboard: a sweep publishes one table, built from `dvc exp show` (convnets.compare: the rows
compare.html shows for the same experiments) and what only the sweep knows (status, worker,
attempts); a point with no experiment still has its row. The terminal prints the same rows.

The sweep's runs are faked (pipeline.sweep.run_points) and so is DVC's answer (compare.exp_show):
one temporary Prefect API (prefect_test_harness) holds the artifacts.
"""

from __future__ import annotations

import atexit
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

# Prefect reads PREFECT_HOME when first imported (and creates it): a throw-away folder, never ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="convnets-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName  # noqa: E402
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect_fleet import seeded_test_harness  # noqa: E402

from convnets import compare  # noqa: E402
from pipeline import results, sweep, tasks  # noqa: E402
from pipeline.__main__ import main  # noqa: E402
from pipeline.prefect_api import latest_table  # noqa: E402

ENVIRONMENTS = {"1" * 40: "98dddbe733d1", "2" * 40: "4b1e07c2a9f0"}


@pytest.fixture(scope="module", autouse=True)
def prefect_api(prefect_database):
    with seeded_test_harness(prefect_database):
        yield


def experiment(name: str, rev: str, accuracy: float, seed: int, batch: int) -> dict:
    metrics = {
        "data/eval/metrics.json": {"data": {"test": {"accuracy": accuracy, "roc_auc": accuracy + 0.05}}},
        "data/train/metrics.json": {"data": {"step": 4, "best": {"epoch": 3}}},
        "timings/train.json": {"data": {"seconds": 95.0}},
    }
    params = {"params.yaml": {"data": {"seed": seed, "train": {"epochs": 5, "batch_size": batch}}}}
    return {
        "executor": None,
        "name": name,
        "revs": [{"rev": rev, "name": name, "error": None, "data": {"params": params, "metrics": metrics}}],
    }


SHOW = [
    {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
    {
        "rev": "c" * 40,
        "name": "main",
        "data": {},
        "error": None,
        "experiments": [
            experiment("t-seed-1", "1" * 40, 0.70, seed=1, batch=16),
            experiment("t-seed-2", "2" * 40, 0.75, seed=2, batch=32),
            experiment("not-this-sweeps", "3" * 40, 0.99, seed=3, batch=64),
        ],
    },
]


class Reader(compare.PlotReader):
    """Each experiment's devices.json as DVC would give it (two different locks); no plots."""

    def read(self, rev, path):
        if path == compare.DEVICES and rev in ENVIRONMENTS:
            return json.dumps({"gpus": [], "environment": {"lock": ENVIRONMENTS[rev], "python": "3.11.7"}})
        return None


def fake_runs(flow, points, *how):
    seed_1, seed_2, seed_3 = points
    return [
        results.Outcome(seed_1, status="done", host="gpu-1", attempts=1, seconds=600.0),
        results.Outcome(seed_2, status="already done", host="gpu-2", attempts=2),
        results.Outcome(
            seed_3, status="failed", message="stage 'train' failed: out of memory", host="gpu-1", attempts=1
        ),
    ]


def sweep_tables(wait_s: float = 30) -> dict[str, list[dict]]:
    """The table artifacts of the newest dvc-sweep flow run, by key (waiting for the API to show them)."""
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dvc-sweep"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        while True:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            tables = {
                a.key: json.loads(a.data) if isinstance(a.data, str) else a.data for a in found if a.type == "table"
            }
            if tables or time.monotonic() > deadline:
                return tables
            time.sleep(0.2)


def page_rows(page: str) -> list[dict[str, str]]:
    """The rows of compare.html's leaderboard, by its column names."""
    board = page[page.index('<table class="leaderboard">') :]
    board = board[: board.index("</table>")]
    headers = [html.unescape(h) for h in re.findall(r"<th[^>]*>([^<]*)</th>", board)]
    return [
        dict(zip(headers, (html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", row)), strict=True))
        for row in re.findall(r"<tr>(.*?)</tr>", board)[1:]
    ]


def test_a_sweep_publishes_one_leaderboard_with_compare_html_rows_and_the_sweeps_columns(
    project_copy, tmp_path, monkeypatch, capsys
):
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=project_copy, check=True)
    subprocess.run(["git", "push", "-q", "-u", "origin", "main"], cwd=project_copy, check=True, capture_output=True)
    pulled = []
    monkeypatch.setattr(sweep, "run_points", fake_runs)
    monkeypatch.setattr(tasks, "pull_experiments", lambda project, remote, names: pulled.extend(names))
    monkeypatch.setattr(compare, "exp_show", lambda repo=".", all_commits=False: SHOW)
    monkeypatch.setattr(compare, "PlotReader", Reader)

    assert main(["sweep", "-S", "seed=1,2,3", "--name-prefix", "t", "--project", str(project_copy)]) == 1
    out = capsys.readouterr().out
    assert pulled == ["t-seed-1", "t-seed-2"]

    tables = sweep_tables()
    assert list(tables) == ["dvc-leaderboard"]  # one table, not a second one with the same figures
    rows = tables["dvc-leaderboard"]
    page = compare.compare(project_copy, ["t-seed-1", "t-seed-2"], out=tmp_path / "compare.html", show=SHOW)
    shown = page_rows(page.read_text())
    assert [r["experiment"] for r in shown] == ["t-seed-2", "t-seed-1"] and "environment" in shown[0]
    assert [{column: row[column] for column in shown[0]} for row in rows[:2]] == shown  # compare.html's rows
    assert [(r["status"], r["worker"], r["attempts"]) for r in rows] == [
        ("already done", "gpu-2", "2"),
        ("done", "gpu-1", "1"),
        ("failed: stage 'train' failed: out of memory", "gpu-1", "1"),
    ]
    assert rows[2]["experiment"] == "t-seed-3" and rows[2]["test accuracy"] == ""  # no experiment: still a row
    assert results.text_table(rows) in out  # the terminal: the same table
    assert latest_table("dvc-sweep") == []


def test_latest_table_is_the_newest_version_of_a_key():
    from prefect import flow
    from prefect.artifacts import create_table_artifact

    @flow
    def publish(value: str) -> None:
        create_table_artifact(key="units-latest", table=[{"v": value}])

    assert latest_table("units-latest") == []
    publish("1")
    publish("2")
    assert latest_table("units-latest") == [{"v": "2"}]
