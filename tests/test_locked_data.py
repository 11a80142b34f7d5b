"""pipeline.locked: an experiment leaves the data stages' outputs out of its clone only when the
commit's dvc.lock holds every data stage exactly as the point would run it."""

from __future__ import annotations

import pytest
import yaml

from conftest import git
from pipeline.locked import locked_data_reused

DATA_STAGES = ["fetch", "split", "preprocess"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project's dvc.yaml, dvc.lock, conf/ and code, which the check reads (never the data)."""
    from conftest import copy_working_tree

    return copy_working_tree(tmp_path_factory.mktemp("locked") / "project")


def test_the_committed_lock_holds_the_data_stages_of_the_default_params(project):
    # The premise of everything below: dvc.lock is current for the data stages (`make run` keeps it so).
    assert locked_data_reused(project, [], DATA_STAGES)


@pytest.mark.parametrize(
    "overrides", [["train.epochs=1"], ["train.epochs=1", "model.dropout=0.5", "evaluate.tta=true"]]
)
def test_points_that_change_only_later_stages_reuse_the_locked_data(project, overrides):
    assert locked_data_reused(project, overrides, DATA_STAGES)


@pytest.mark.parametrize(
    "overrides",
    [
        ["split.train_size=300"],  # the fleet test's case: DVC skipped fetch, then preprocess lacked data/raw
        ["seed=1"],  # split reads the seed too
        ["preprocess.image_size=[20,20]"],
        ["fetch.source=keras"],
        ["dataset=dogs_vs_cats"],  # a preset: every data section changes
    ],
)
def test_points_that_change_a_data_stage_pull_everything(project, overrides):
    assert not locked_data_reused(project, overrides, DATA_STAGES)


def edit(path, old: str, new: str) -> str:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return text


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("src/convnets/split.py", '"""', '"""Edited. '),  # the stage's code, not re-locked
        ("dvc.yaml", "python -m convnets.split data/raw", "python -m convnets.split  data/raw"),  # its command
        ("dvc.yaml", "      - src/convnets/split.py\n", "      - src/convnets/split.py\n      - README.md\n"),
        ("dvc.yaml", "      - seed\n      - split\n", "      - seed\n      - split\n      - preprocess\n"),
        ("dvc.yaml", "    outs:\n      - data/split\n", "    outs:\n      - data/split\n      - data/split-extra\n"),
        ("runtime.yaml", "\nsplit:\n", "\nsplit:\n  an-upgraded-package: 9.9.9\n"),  # its environment
    ],
    ids=["code", "command", "new-dep", "params-list", "outs", "environment"],
)
def test_a_data_stage_changed_since_its_lock_entry_is_not_reused(project, file, old, new):
    original = edit(project / file, old, new)
    try:
        assert not locked_data_reused(project, [], DATA_STAGES)
    finally:
        (project / file).write_text(original, encoding="utf-8")
    assert locked_data_reused(project, [], DATA_STAGES)


def test_no_lock_or_no_entry_means_no_reuse(project):
    lock = project / "dvc.lock"
    original = lock.read_text(encoding="utf-8")
    try:
        stages = yaml.safe_load(original)
        del stages["stages"]["preprocess"]
        lock.write_text(yaml.safe_dump(stages), encoding="utf-8")
        assert not locked_data_reused(project, [], DATA_STAGES)
        lock.unlink()
        assert not locked_data_reused(project, [], DATA_STAGES)
    finally:
        lock.write_text(original, encoding="utf-8")
    assert not locked_data_reused(project, [], [])  # nothing upstream of train: nothing to leave out


def test_the_check_leaves_the_clone_as_it_found_it(project):
    # DVC reads the point's params.yaml in a scratch copy: the clone's stays the commit's.
    assert not locked_data_reused(project, ["split.train_size=300"], DATA_STAGES)
    assert git(project, "status", "--porcelain", "--untracked-files=all").strip() == ""


def test_entries_that_disagree_with_the_stage_above_are_not_reused(project):
    # As DVC's repro: preprocess locked on another data/split than split's locked output would run.
    lock = project / "dvc.lock"
    original = lock.read_text(encoding="utf-8")
    stages = yaml.safe_load(original)
    dep = next(dep for dep in stages["stages"]["preprocess"]["deps"] if dep["path"] == "data/split")
    dep["md5"] = "0" * 32 + ".dir"
    try:
        lock.write_text(yaml.safe_dump(stages), encoding="utf-8")
        assert not locked_data_reused(project, [], DATA_STAGES)
    finally:
        lock.write_text(original, encoding="utf-8")


def test_entries_handed_over_by_another_run_are_adopted_and_still_checked(project):
    from pipeline.locked import adopt_entries, stage_entries

    lock = project / "dvc.lock"
    original = lock.read_text(encoding="utf-8")
    entries = stage_entries(project, DATA_STAGES)
    assert sorted(entries) == sorted(DATA_STAGES)
    try:
        stages = yaml.safe_load(original)
        for stage in DATA_STAGES:
            del stages["stages"][stage]
        lock.write_text(yaml.safe_dump(stages), encoding="utf-8")
        assert not locked_data_reused(project, [], DATA_STAGES)
        adopt_entries(project, entries)
        assert locked_data_reused(project, [], DATA_STAGES)
        assert "train" in yaml.safe_load(lock.read_text())["stages"]  # the other entries are kept
        # entries of other params than the point's are no licence to skip anything
        assert not locked_data_reused(project, ["split.train_size=300"], DATA_STAGES)
        lock.unlink()
        adopt_entries(project, entries)  # a commit without dvc.lock
        assert locked_data_reused(project, [], DATA_STAGES)
    finally:
        lock.write_text(original, encoding="utf-8")
