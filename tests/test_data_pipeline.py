"""The documented switch to dogs vs. cats, `dvc exp run -S dataset=dogs_vs_cats`, in a copy of the repo."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import yaml

from conftest import SHARED_DIR, copy_working_tree, venv_env

REPLICA = SHARED_DIR / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"


def test_hydra_override_composes_the_dogs_vs_cats_params(tmp_path, repo_root):
    from dvc.utils.hydra import compose_and_dump

    from convnets.params import load_params

    out = tmp_path / "params.yaml"
    compose_and_dump(
        out, os.fspath(repo_root / "conf"), None, "config", "", ["dataset=dogs_vs_cats", "fetch.source=kaggle"]
    )
    params = load_params(out)
    assert params.fetch.source == "kaggle" and params.fetch.classes == ["cat", "dog"]
    assert params.split.method == "index_ranges" and params.split.test_range == [1500, 2500]
    assert params.preprocess.image_size == [180, 180] and params.preprocess.channels == 3
    composed = yaml.safe_load(out.read_text())
    assert "mnist_url" not in composed["fetch"] and "train_size" not in composed["split"]  # no MNIST leftovers


@pytest.mark.slow
@pytest.mark.skipif(not REPLICA.is_file(), reason=f"the offline replica {REPLICA} is not there")
def test_dvc_exp_run_switches_the_data_stages(tmp_path):
    project = copy_working_tree(tmp_path / "project")
    (tmp_path / "shared").symlink_to(SHARED_DIR)  # the preset's ../shared/... as in a real clone
    smaller = ["-S", "split.train_range=[0,100]", "-S", "split.val_range=[100,150]", "-S", "split.test_range=[150,250]"]
    run = subprocess.run(
        ["dvc", "exp", "run", "preprocess", "-S", "dataset=dogs_vs_cats", *smaller],
        cwd=project,
        capture_output=True,
        text=True,
        env=venv_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fetch: 23000 images in 2 classes" in run.stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["fetch"]["source"] == "archive" and params["preprocess"]["image_size"] == [180, 180]
    prepared = project / "data" / "prepared"
    report = json.loads((prepared / "report.json").read_text())
    assert report["kept"] == {"train": 200, "val": 100, "test": 200} and report["rejected"] == 0
    assert json.loads((prepared / "classes.json").read_text()) == ["cat", "dog"]
    images = np.load(prepared / "train_images.npy", mmap_mode="r")
    assert images.shape == (200, 180, 180, 3) and images.dtype == np.uint8
    assert np.bincount(np.load(prepared / "train_labels.npy")).tolist() == [100, 100]
    manifest = (project / "data" / "split" / "manifest.csv").read_text().splitlines()
    assert manifest[1] == "images/cat/cat.0.jpg,cat,0,train" and manifest[-1] == "images/dog/dog.249.jpg,dog,249,test"
    # Downloads never enter git: they live in the user cache, and DVC's outputs are ignored.
    status = subprocess.run(["git", "status", "--porcelain", "data"], cwd=project, capture_output=True, text=True)
    assert status.stdout == ""
