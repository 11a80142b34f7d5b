"""Each experiment is one `dvc exp run -S +experiment=NAME`; their metrics sit side by side in `dvc exp show`."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import SHARED_DIR, copy_working_tree, venv_env

pytestmark = pytest.mark.slow
REPLICA = SHARED_DIR / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
PER_CLASS = 40  # photos 0..39 of each class: what the ranges below read
# The documented commands, made small: 40 + 20 + 20 photos of 32 px, one epoch.
TINY = [
    "-S",
    "split.train_range=[0,20]",
    "-S",
    "split.val_range=[20,30]",
    "-S",
    "split.test_range=[30,40]",
    "-S",
    "preprocess.image_size=[32,32]",
    "-S",
    "train.epochs=1",
]


def replica_slice(folder: Path) -> list[str]:
    """The replica's first PER_CLASS photos of each class as a bare train.zip (a layout fetch reads),
    and the overrides that fetch it: DVC hashing the whole replica's 23,000 extracted photos cost
    this test about a minute, and tests/test_data_fetch.py reads the whole replica already."""
    with zipfile.ZipFile(REPLICA) as outer, zipfile.ZipFile(io.BytesIO(outer.read("train.zip"))) as train:
        names = [f"train/{label}.{index}.jpg" for label in ("cat", "dog") for index in range(PER_CLASS)]
        folder.mkdir(parents=True)
        with zipfile.ZipFile(folder / "train.zip", "w") as sliced:
            for name in names:
                sliced.writestr(name, train.read(name))
    digest = hashlib.sha256((folder / "train.zip").read_bytes()).hexdigest()
    archive = (folder / "train.zip").relative_to(folder.parent)
    return ["-S", f"fetch.archive=../{archive}", "-S", f"fetch.archive_sha256={digest}"]


def dvc(project, *args):
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=venv_env())
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(not REPLICA.is_file(), reason=f"the offline replica {REPLICA} is not there")
def test_two_experiments_side_by_side(tmp_path):
    project = copy_working_tree(tmp_path / "project")
    archive = replica_slice(tmp_path / "replica-slice")  # beside the project, as the preset's ../shared/...
    # The book's scratch convnet needs > 32 px; conv_filters shrink it for the tiny photos.
    first = dvc(
        project,
        "exp",
        "run",
        "-n",
        "scratch",
        "-S",
        "+experiment=scratch",
        *TINY,
        *archive,
        "-S",
        "model.conv_filters=[8,8]",
        "-S",
        "model.pooled_blocks=2",
    )
    assert "Running stage 'fetch'" in first and "Running stage 'report'" in first
    second = dvc(
        project,
        "exp",
        "run",
        "-n",
        "augmented",
        "-S",
        "+experiment=augmented",
        *TINY,
        *archive,
        "-S",
        "model.conv_filters=[8,8]",
        "-S",
        "model.pooled_blocks=2",
    )
    assert "Running stage 'train'" in second and "Running stage 'fetch'" not in second  # data stages reused

    shown = json.loads(dvc(project, "exp", "show", "--json"))
    runs = {
        rev["name"]: rev["data"]
        for row in shown
        for exp in row.get("experiments") or []
        for rev in exp.get("revs") or []
        if rev.get("name") in {"scratch", "augmented"}
    }
    assert set(runs) == {"scratch", "augmented"}
    for name, data in runs.items():
        test = data["metrics"]["data/eval/metrics.json"]["data"]["test"]
        assert 0 <= test["accuracy"] <= 1 and "roc_auc" in test, name
        trained = data["metrics"]["data/train/metrics.json"]["data"]
        assert trained["step"] == 0 and trained["devices"]["replicas"] == 1
        # Wall-clock figures reach the experiment from outside the hashed outputs.
        assert "seconds_per_epoch" not in trained
        assert data["metrics"]["timings/train.json"]["data"]["seconds_per_epoch"] > 0
    params = {name: data["params"]["params.yaml"]["data"] for name, data in runs.items()}
    assert params["scratch"]["model"]["dropout"] == 0.0 and params["augmented"]["model"]["dropout"] == 0.5
    assert params["augmented"]["model"]["augmentation"]["flip"] == "horizontal"
    assert params["scratch"]["fetch"]["source"] == "archive"

    table = dvc(project, "exp", "show", "--csv", "--only-changed")
    header = table.splitlines()[0]
    assert "test.accuracy" in header and "model.dropout" in header
    plots = tmp_path / "plots"
    dvc(project, "plots", "show", "-o", str(plots))
    page = (plots / "index.html").read_text()
    assert "ROC curve (test)" in page and "Precision-recall curve (test)" in page
    # Nothing left behind for git: the resume state is gone, outputs are DVC's.
    status = subprocess.run(["git", "status", "--porcelain", "data"], cwd=project, capture_output=True, text=True)
    assert status.stdout == "" and not (project / "data" / "train-resume").exists()
