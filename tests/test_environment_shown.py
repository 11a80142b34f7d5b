"""Every result says which environment made it: the report's header, and the compare page per experiment.

The train stage records the environment in data/train/devices.json ("environment": the
uv.lock hash, Python, TensorFlow, Keras); these pages show it. No TensorFlow here: the
stages' outputs are written by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import default_params
from convnets import compare
from convnets.figures import environment_of
from convnets.params import Params
from convnets.presentation import environment_text
from convnets.report import report

ENV = {"lock": "98dddbe733d1", "python": "3.11.7", "tensorflow": "2.21.0", "keras": "3.15.1"}
OTHER = {"lock": "4b1e07c2a9f0", "python": "3.12.3", "tensorflow": "2.21.0", "keras": "3.15.1"}


def stage_outputs(root: Path, devices: dict | None) -> tuple[Path, Path, Path]:
    """data/prepared, data/train and data/eval of a finished two-class run, 8 test photos."""
    prepared, train, evaluated = root / "prepared", root / "train", root / "eval"
    prepared.mkdir(parents=True)
    np.save(prepared / "test_images.npy", np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    np.save(prepared / "test_labels.npy", np.arange(8, dtype=np.int64) % 2)
    (prepared / "classes.json").write_text(json.dumps(["cat", "dog"]))
    (prepared / "report.json").write_text(json.dumps({"kept": {"train": 16, "val": 8, "test": 8}}))
    for split, prefix in (("train", ""), ("eval", "val_")):
        folder = train / "plots" / "metrics" / split
        folder.mkdir(parents=True)
        for metric, values in (("accuracy", [0.6, 0.8]), ("loss", [0.7, 0.4])):
            (folder / f"{metric}.tsv").write_text(
                f"step\t{metric}\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values))
            )
    (train / "metrics.json").write_text(json.dumps({"step": 1, "best": {"epoch": 1}}))
    if devices is not None:
        (train / "devices.json").write_text(json.dumps(devices))
    evaluated.mkdir()
    rows = ["row,true,predicted,confidence"] + [f"{i},{'cat dog'.split()[i % 2]},cat,0.{i + 1}" for i in range(8)]
    (evaluated / "predictions.csv").write_text("\n".join(rows) + "\n")
    (evaluated / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5, "loss": 0.69, "roc_auc": 0.5}}))
    return prepared, train, evaluated


def header_of(page: str) -> dict[str, str]:
    meta = page[page.index('<dl class="meta">') : page.index("</dl>")]
    return {k: re.sub(r"<[^>]+>", "", v) for k, v in re.findall(r"<dt>([^<]*)</dt><dd>(.*?)</dd>", meta)}


def render_report(tmp_path: Path, devices: dict | None) -> str:
    prepared, train, evaluated = stage_outputs(tmp_path / "run", devices)
    params = Params.model_validate(default_params())
    path = report(params, prepared, train, evaluated, tmp_path / "report", run={"experiment": "e", "commit": "c"})
    return path.read_text()


def test_the_report_header_names_the_lock_and_the_versions(tmp_path):
    devices = {"gpus": [], "dtype_policy": "float32", "replicas": 1, "environment": ENV}
    header = header_of(render_report(tmp_path, devices))
    assert header["Environment"] == "uv.lock 98dddbe733d1, Python 3.11.7, TensorFlow 2.21.0, Keras 3.15.1"
    assert header["Device"] == "CPU" and header["Precision"] == "float32"


def test_an_unlocked_or_older_record_says_so(tmp_path):
    unlocked = {**ENV, "lock": "unlocked"}
    assert environment_text(environment_of({"environment": unlocked})).startswith(
        "unlocked (not installed from uv.lock)"
    )
    older = {"gpus": [], "tensorflow": "2.20.0", "keras": "3.11.0"}  # before the lock was recorded
    assert environment_text(environment_of(older)) == "uv.lock not recorded, TensorFlow 2.20.0, Keras 3.11.0"
    assert environment_of({"gpus": []}) is None and environment_text(None) == ""
    assert header_of(render_report(tmp_path, None))["Environment"] == ""


# --- compare ---------------------------------------------------------------------------------


def experiment(name: str, rev: str, accuracy: float, seed: int = 42) -> dict:
    metrics = {
        "data/eval/metrics.json": {"data": {"test": {"accuracy": accuracy, "roc_auc": accuracy}}},
        "data/train/metrics.json": {"data": {"step": 4, "best": {"epoch": 3}}},
    }
    params = {"params.yaml": {"data": {"seed": seed, "train": {"epochs": 5}}}}
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
        "experiments": [experiment("old-env", "1" * 40, 0.70, seed=1), experiment("new-env", "2" * 40, 0.75, seed=2)],
    },
]


class Reader(compare.PlotReader):
    """devices.json per commit, as DVC would give it; no plots."""

    def __init__(self, environments: dict[str, dict]):
        super().__init__(".")
        self.environments = environments

    def read(self, rev, path):
        if path == compare.DEVICES and rev in self.environments:
            return json.dumps({"gpus": [], "environment": self.environments[rev]})
        return None


def test_compare_shows_and_flags_two_different_locks(tmp_path):
    reader = Reader({"1" * 40: ENV, "2" * 40: OTHER})
    experiments = compare.experiments_from_show(SHOW)
    page = compare.render_compare(experiments, reader)
    columns, rows = compare.leaderboard(experiments)
    assert columns[-1] == "environment"
    by_name = {r["experiment"]: r["environment"] for r in rows}
    assert by_name == {"old-env": environment_text(ENV), "new-env": environment_text(OTHER)}
    board = page[page.index('<table class="leaderboard">') : page.index("</table>")]
    assert board.count('class="env"') == 2 and "98dddbe733d1" in board and "4b1e07c2a9f0" in board
    assert 'class="env-differs"' in page and "ran in 2 different environments" in page
    # two seeds from two environments are not averaged together
    assert "mean of" not in page
    rows = compare.leaderboard_rows(SHOW, reader=Reader({"1" * 40: ENV, "2" * 40: OTHER}))
    assert {r["environment"] for r in rows} == {environment_text(ENV), environment_text(OTHER)}
    note = compare.leaderboard_note(SHOW, Reader({"1" * 40: ENV, "2" * 40: OTHER}))
    assert f"{environment_text(OTHER)} (new-env)" in note and f"{environment_text(ENV)} (old-env)" in note


def test_compare_states_one_environment_once(tmp_path):
    reader = Reader({"1" * 40: ENV, "2" * 40: ENV})
    experiments = compare.experiments_from_show(SHOW)
    page = compare.render_compare(experiments, reader)
    assert "environment" not in compare.leaderboard(experiments)[0]
    assert page.count("98dddbe733d1") == 1 and 'class="env-same"' in page
    assert compare.leaderboard_note(SHOW, Reader({"1" * 40: ENV, "2" * 40: ENV})) == (
        "All ran in one environment: uv.lock 98dddbe733d1, Python 3.11.7, TensorFlow 2.21.0, Keras 3.15.1."
    )
    assert "mean of old-env, new-env" in page  # same params but the seed, same environment: one group


def test_an_experiment_without_a_record_shows_a_blank_and_the_flag(tmp_path):
    reader = Reader({"2" * 40: OTHER})  # old-env's devices.json predates the record, or DVC has none
    experiments = compare.experiments_from_show(SHOW)
    page = compare.render_compare(experiments, reader)
    rows = compare.leaderboard(experiments)[1]
    assert {r["experiment"]: r["environment"] for r in rows} == {"old-env": "", "new-env": environment_text(OTHER)}
    assert "Only some of these experiments recorded their environment" in page


# --- through DVC for real: devices.json read at each experiment's commit ------------------------

STAGE = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
os.makedirs("data/train", exist_ok=True)
os.makedirs("data/eval", exist_ok=True)
json.dump({"step": 0, "best": {"epoch": 0}}, open("data/train/metrics.json", "w"))
json.dump({"gpus": [], "environment": {"lock": p["lock"], "python": "3.11.7", "tensorflow": "2.21.0",
           "keras": "3.15.1"}}, open("data/train/devices.json", "w"))
json.dump({"test": {"accuracy": p["accuracy"]}}, open("data/eval/metrics.json", "w"))
"""
DVC_YAML = f"""\
stages:
  train:
    cmd: {sys.executable} train.py
    deps: [train.py]
    params: [lock, accuracy]
    outs: [data/train, data/eval]
metrics:
  - data/train/metrics.json
  - data/eval/metrics.json
"""


@pytest.mark.slow
def test_compare_reads_each_experiments_environment_through_dvc(tmp_path):
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*command):
        return subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q", "-b", "main")
    run("git", "config", "user.email", "t@example.org")
    run("git", "config", "user.name", "t")
    run(dvc, "init", "-q")
    (tmp_path / "train.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("lock: 98dddbe733d1\naccuracy: 0.5\n")
    run(dvc, "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")
    run(dvc, "exp", "run", "-q", "-n", "locked-a", "-S", "accuracy=0.7")
    run(dvc, "exp", "run", "-q", "-n", "locked-b", "-S", "accuracy=0.8", "-S", "lock=4b1e07c2a9f0")
    shutil.rmtree(tmp_path / "data")  # the workspace's outputs are not what is read: each commit's are

    # compare asks the DVC it runs with, in-process: the same data as the command prints
    in_process = json.loads(json.dumps(compare.exp_show(tmp_path), default=lambda date: date.isoformat()))
    assert in_process == json.loads(run(dvc, "exp", "show", "--json"))
    page = compare.compare(tmp_path, out=tmp_path / "compare.html").read_text()
    board = page[page.index('<table class="leaderboard">') : page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", board[board.index("<tbody>") :])
    assert "locked-b" in rows[0] and "uv.lock 4b1e07c2a9f0" in rows[0]
    assert "locked-a" in rows[1] and "uv.lock 98dddbe733d1" in rows[1]
