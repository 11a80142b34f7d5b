"""What a worker removes from its disk (pipeline.clean, `python -m pipeline clean`).

One worker machine under tmp_path: its work folder of run clones, its environments, its
git mirrors and DVC cache, and its user cache with resume states. Clones are made by the real
clean_checkout from a tiny git repository; environments are folders laid out as
pipeline.environments leaves them (no uv needed to delete one); "old" is set with os.utime.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import git
from pipeline import clean, environments, workspace
from pipeline.__main__ import main

HOUR = 3600
DAY = 24 * HOUR


@pytest.fixture
def machine(tmp_path, monkeypatch, user_cache) -> Path:
    """One worker machine: work folder, mirrors, DVC cache and environments under tmp_path."""
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.GIT_MIRRORS_ENV, str(tmp_path / "mirrors"))
    monkeypatch.setenv(workspace.DVC_CACHE_ENV, str(tmp_path / "dvc-cache"))
    monkeypatch.setenv(environments.ENVS_DIR_ENV, str(tmp_path / "envs"))
    monkeypatch.setenv(environments.KEEP_ENV, "1")
    monkeypatch.delenv(clean.RESUME_URL_ENV, raising=False)
    return tmp_path


@pytest.fixture
def origin(tmp_path) -> tuple[Path, str]:
    """A bare repository with one commit: what the runs clone."""
    work, bare = tmp_path / "work", tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    (work / "f").write_text("one\n")
    git(work, "add", "f")
    git(work, "commit", "-q", "-m", "one")
    git(work, "push", "-q", str(bare), "main")
    return bare, git(work, "rev-parse", "HEAD").strip()


def age(path: Path, seconds: float) -> Path:
    """Set the modification time of `path` and everything in it `seconds` back."""
    when = time.time() - seconds
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (when, when), follow_symlinks=False)
    return path


def left_behind(origin: tuple[Path, str], label: str) -> Path:
    """The clone of a run whose worker died with it: clean_checkout's folder, never removed."""
    repository, commit = origin
    with pytest.raises(workspace.KeepCheckout), workspace.clean_checkout(str(repository), commit, label) as clone:
        (clone / "data").mkdir()
        (clone / "data" / "model.keras").write_bytes(b"m" * 10_000)
        raise workspace.KeepCheckout("the worker was killed here")
    return clone


def resume_state(root: Path, name: str, epoch: int = 3) -> Path:
    """A training state as convnets.resume leaves one: key.json and the last epoch's folder."""
    state = root / name
    (state / f"epoch-{epoch:04d}").mkdir(parents=True)
    (state / "key.json").write_text("{}")
    (state / f"epoch-{epoch:04d}" / "state.weights.h5").write_bytes(b"w" * 5_000)
    return state


def environment(root: Path, key: str, used_seconds_ago: float) -> Path:
    """An environment as pipeline.environments leaves it: packages, .complete, .last-used."""
    folder = root / key
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "package.py").write_bytes(b"p" * 3_000)
    (folder / environments.COMPLETE).write_text(key + "\n")
    (folder / environments.LAST_USED).touch()
    age(folder, used_seconds_ago)
    return folder


def planned(machine: Path, **options) -> dict[str, str]:
    """{path: kind} of what a clean of this machine would remove."""
    return {str(item.path): item.kind for item in clean.plan(**options)}


# --- clones -------------------------------------------------------------------------------


def test_a_dead_runs_clone_is_removed_and_a_live_runs_clone_is_kept(machine, origin):
    dead = age(left_behind(origin, "dead"), 2 * HOUR)
    repository, commit = origin
    with workspace.clean_checkout(str(repository), commit, "live") as live:
        # what a live run does in its clone for hours: `dvc exp run` works there
        with subprocess.Popen(["sleep", "60"], cwd=live) as dvc:
            try:
                age(live, 2 * HOUR)
                plan = planned(machine)
                assert plan.get(str(dead)) == "clone"
                assert str(live) not in plan
                assert main(["clean"]) == 0
                assert not dead.exists() and (live / "f").is_file()
            finally:
                dvc.kill()


def test_a_clone_its_run_holds_a_lock_on_is_kept(machine, origin):
    """The run's flock on its folder (taken by clean_checkout, released when the run's process dies)."""
    clone = age(left_behind(origin, "locked"), 2 * HOUR)
    handle = os.open(clone, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        assert clean.run_folder_locked(clone)
        assert str(clone) not in planned(machine, in_use=clean.run_folder_locked)
    finally:
        os.close(handle)
    assert not clean.run_folder_locked(clone)
    assert str(clone) in planned(machine, in_use=clean.run_folder_locked)


def test_a_clone_made_a_moment_ago_is_kept_though_no_process_works_in_it_yet(machine, origin):
    fresh = left_behind(origin, "fresh")
    assert str(fresh) not in planned(machine)


def test_a_dead_clone_holding_an_unpushed_experiment_stays_until_it_is_older_than_the_age(machine, origin):
    kept = left_behind(origin, "kept")
    git(kept, "update-ref", "refs/exps/ab/cd/kept", "HEAD")  # what a refused `dvc exp push` leaves
    age(kept, 2 * HOUR)
    assert str(kept) not in planned(machine)
    age(kept, 8 * DAY)
    assert planned(machine, older_than_s=7 * DAY).get(str(kept)) == "clone"


def test_a_folder_of_the_work_folder_that_no_run_made_is_left_alone(machine):
    mine = workspace.work_root() / "notes"
    mine.mkdir()
    age(mine, 30 * DAY)
    assert str(mine) not in planned(machine)


# --- resume states ------------------------------------------------------------------------


def test_resume_states_older_than_the_age_are_removed_and_fresh_ones_kept(machine, user_cache):
    root = user_cache / "convnets" / "train-resume"
    old = age(resume_state(root, "old"), 8 * DAY)
    fresh = resume_state(root, "fresh")
    assert main(["clean", "--older-than", "7"]) == 0
    assert not old.exists() and (fresh / "key.json").is_file()


def test_mirrored_resume_states_older_than_the_age_are_removed(machine, tmp_path):
    mirror = tmp_path / "remote-train-resume"
    old, fresh = resume_state(mirror, "old"), resume_state(mirror, "fresh")
    (old / "LATEST").write_text("epoch-0003")
    (fresh / "LATEST").write_text("epoch-0003")
    age(old, 8 * DAY)
    assert main(["clean", "--older-than", "7", "--resume-url", str(mirror)]) == 0
    assert not old.exists() and (fresh / "LATEST").is_file()


# --- environments -------------------------------------------------------------------------


def test_environments_beyond_the_kept_ones_are_removed_never_one_in_use(machine):
    root = machine / "envs"
    newest = environment(root, "newest", 10)
    extra = environment(root, "extra", DAY)
    held = environment(root, "held", 2 * DAY)
    with open(root / "held.lock", "a+") as in_use:
        fcntl.flock(in_use, fcntl.LOCK_SH)  # a run is using it
        assert planned(machine) == {str(extra): "environment"}
        assert main(["clean"]) == 0
    assert newest.is_dir() and held.is_dir() and not extra.exists()


class Killed(BaseException):
    """The worker killed in the middle of a clean (not an Exception: nothing may catch it)."""


def test_a_clean_killed_half_way_through_an_environment_leaves_it_unmarked(machine, monkeypatch):
    root = machine / "envs"
    environment(root, "newest", 10)
    extra = environment(root, "extra", DAY)
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        if Path(path) == extra:
            real_rmtree(extra / "lib")
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(Killed):
        main(["clean"])
    assert extra.is_dir() and not environments.is_complete(extra)  # the next run rebuilds it


# --- the command --------------------------------------------------------------------------


def test_a_dry_run_lists_what_a_clean_removes_and_removes_nothing(machine, origin, user_cache, capsys):
    dead = age(left_behind(origin, "dead"), 2 * HOUR)
    old = age(resume_state(user_cache / "convnets" / "train-resume", "old"), 8 * DAY)
    environment(machine / "envs", "newest", 10)
    extra = environment(machine / "envs", "extra", DAY)
    assert main(["clean", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert dead.is_dir() and old.is_dir() and environments.is_complete(extra)
    for path in (dead, old, extra):
        assert str(path) in listed
    assert "would free" in listed and "nothing removed" in listed
    assert main(["clean"]) == 0
    removed = capsys.readouterr().out
    assert not dead.exists() and not old.exists() and not extra.exists()
    assert "freed" in removed


def test_the_machines_dvc_cache_is_left_alone(machine, origin):
    cache = machine / "dvc-cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    (cache / "cdef").write_bytes(b"d" * 1_000)
    age(machine / "dvc-cache", 400 * DAY)
    assert main(["clean", "--older-than", "1"]) == 0
    assert (cache / "cdef").read_bytes() == b"d" * 1_000


def test_freed_bytes_leave_out_files_hard_linked_elsewhere(tmp_path):
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "own").write_bytes(b"o" * 1_000)
    (tmp_path / "cache-file").write_bytes(b"c" * 5_000)
    os.link(tmp_path / "cache-file", folder / "linked")  # DVC's hardlink cache type
    assert clean.freed_bytes(folder) == 1_000
