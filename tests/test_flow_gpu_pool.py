"""Train on a `gpu` work pool for real: a Prefect server on loopback, a process worker started in
a folder that is no checkout, a git remote it clones the parent's commit from, a local DVC
remote between the two, the MNIST sample with tiny params.

Everything is started here and stopped in `finally`, process groups and all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from prefect_fleet import Processes, clone_env, free_port, processes_in, run, seed_database, wait_for_server

from conftest import copy_working_tree, git

pytestmark = pytest.mark.slow

TINY = ["-S", "train.epochs=1", "-S", "split.train_size=300", "-S", "split.val_size=100", "-S", "split.test_size=100"]
# no Grad-CAM or example pages: seconds of the parent's evaluate and report that this test does not look at
TINY += ["-S", "evaluate.heatmaps=0", "-S", "report.misclassified_examples=0"]
FLOW_TIMEOUT_S = 900


def test_train_runs_on_the_gpu_pool_worker_and_comes_back_through_dvc(tmp_path, prefect_database):
    origin = copy_working_tree(tmp_path / "origin")
    parent, worker = tmp_path / "parent", tmp_path / "worker-home"
    git(tmp_path, "clone", "-q", str(origin), str(parent))
    worker.mkdir()
    commit = git(parent, "rev-parse", "HEAD").strip()

    port = free_port()
    server_env = clone_env(tmp_path, port)
    parent_env = clone_env(tmp_path, port, parent)
    worker_env = {**clone_env(tmp_path, port), "XDG_CACHE_HOME": str(tmp_path / "worker-cache")}
    # the parent's DVC remote (config.local: not in git); the worker is told it with the request
    run(["dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "dvc-remote")], parent, server_env)

    processes = Processes()
    try:
        seed_database(prefect_database, tmp_path / "prefect-home")  # clone_env's PREFECT_HOME
        server_log = tmp_path / "server.log"
        server = processes.start(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            tmp_path,
            server_env,
            server_log,
        )
        wait_for_server(server, port, server_log)
        run(["prefect", "work-pool", "create", "gpu", "--type", "process"], parent, parent_env)
        run(["prefect", "work-pool", "set-concurrency-limit", "gpu", "1"], parent, parent_env)
        run(["prefect", "--no-prompt", "deploy", "--name", "train-gpu"], parent, parent_env)
        worker_log = tmp_path / "worker.log"
        processes.start(
            ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"], worker, worker_env, worker_log
        )

        flow = subprocess.run(
            [sys.executable, "-m", "pipeline", *TINY],
            cwd=parent,
            env=parent_env,
            capture_output=True,
            text=True,
            timeout=FLOW_TIMEOUT_S,
        )
        output = flow.stdout + flow.stderr
        assert flow.returncode == 0, f"flow failed:\n{output[-8000:]}\n--- worker:\n{worker_log.read_text()[-5000:]}"
    finally:
        processes.stop()

    # the parent sent train away and only restored its result, through DVC's run cache
    assert "train: ran on gpu" in flow.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in output
    # it ran in a clean clone of the parent's commit, removed afterwards; the worker's folder is untouched
    worker_text = worker_log.read_text()
    assert f"'train' ran at {commit[:7]} in a clean clone" in worker_text
    assert "Running stage 'preprocess'" not in worker_text  # it pulled train's inputs, ran nothing else
    assert list((tmp_path / "worker-cache" / "convnets" / "runs").iterdir()) == []
    assert list(worker.iterdir()) == []
    parent_lock = yaml.safe_load((parent / "dvc.lock").read_text())["stages"]
    assert parent_lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    # the parent carried on with evaluate and report and ends clean
    assert (parent / "data/report/report.html").is_file()
    status = run(["dvc", "status", "--json"], parent, server_env)
    assert json.loads(status) == {}
    # no process of ours is left
    assert processes_in(tmp_path) == []
