"""DVC end to end in a fresh copy of the repo: repro, no-op repro, and comparing two commits."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from conftest import TINY_OVERRIDES, default_params, git, venv_env, write_params

pytestmark = pytest.mark.slow
STAGES = ["fetch", "split", "preprocess", "train", "evaluate", "report"]


def dvc(project, *args, check=True):
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=venv_env())
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A copy of the repo with tiny params, reproduced once and committed."""
    from conftest import copy_working_tree

    project = copy_working_tree(tmp_path_factory.mktemp("e2e"))
    write_params(project / "params.yaml", TINY_OVERRIDES)
    run = dvc(project, "repro")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "tiny params, first run")
    return project, run.stdout


def test_repro_runs_the_six_stages_in_order(reproduced):
    project, log = reproduced
    positions = [log.index(f"Running stage '{stage}'") for stage in STAGES]
    assert positions == sorted(positions)
    for path in (
        "data/model/model.keras",
        "data/eval/metrics.json",
        "data/report/report.html",
        "data/prepared/train_images.npy",
        "data/split/manifest.csv",
        "data/raw/catalog.csv",
    ):
        assert (project / path).is_file(), path
    tracked = git(project, "ls-files", "data").split()
    assert tracked == ["data/.gitignore"]  # outputs are DVC's, never git's


def test_second_repro_does_nothing_and_status_is_clean(reproduced):
    project, _ = reproduced
    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    status = dvc(project, "status", "--json")
    assert json.loads(status.stdout) == {}


def test_metrics_and_plots_show(reproduced):
    project, _ = reproduced
    metrics = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert files["data/eval/metrics.json"]["data"]["test"]["accuracy"] > 0.3
    assert "kept" in files["data/prepared/report.json"]["data"]
    out = project.parent / "plots"
    dvc(project, "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    for title in ("Accuracy per epoch", "Loss per epoch", "Confusion matrix (test)"):
        assert title in page


def test_two_commits_compare_with_metrics_diff(reproduced):
    project, _ = reproduced
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project / "params.yaml", {"train": {"epochs": 3}}, base=params)
    log = dvc(project, "repro").stdout
    assert "Running stage 'train'" in log and "Running stage 'fetch'" not in log
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "train one epoch longer")
    diff = json.loads(dvc(project, "metrics", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert diff["data/train/metrics.json"]["step"] == {"old": 1, "new": 2, "diff": 1}
    params_diff = json.loads(dvc(project, "params", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert params_diff["params.yaml"]["train.epochs"]["new"] == 3
    shown = dvc(project, "plots", "diff", "HEAD~1", "HEAD", "--json").stdout
    assert "HEAD~1" in shown
    exp = json.loads(dvc(project, "exp", "show", "--json").stdout)
    assert exp, "dvc exp show returned nothing"


def test_exp_run_with_overrides_is_an_experiment(reproduced):
    """`dvc exp run -S` composes params.yaml from conf/ (Hydra) plus the overrides."""
    project, _ = reproduced
    sets = [f"{section}.{key}={value}" for section, values in TINY_OVERRIDES.items() for key, value in values.items()]
    args = [arg for item in sets + ["train.epochs=1"] for arg in ("-S", item)]
    dvc(project, "exp", "run", "-n", "one-epoch", *args)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["epochs"] == 1 and params["split"]["train_size"] == 300
    assert params["model"] == default_params()["model"]  # the rest comes from conf/
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    assert "one-epoch" in json.dumps(shown)


def test_stages_run_the_code_of_the_checkout_they_run_in(tmp_path):
    """Not the editable install's: a clone or `dvc exp run --temp` copy runs the code its deps hash."""
    from conftest import copy_working_tree

    project = copy_working_tree(tmp_path / "clone")
    write_params(project / "params.yaml", TINY_OVERRIDES)
    stage = project / "src" / "convnets" / "split.py"
    code = stage.read_text()
    assert 'if __name__ == "__main__":' in code
    stage.write_text(
        code.replace('if __name__ == "__main__":', 'print("split.py of this clone")\nif __name__ == "__main__":')
    )
    log = dvc(project, "repro", "split").stdout
    assert "split.py of this clone" in log
