"""The worker's run environments (pipeline.environments) and the locked install (Makefile, uv.lock).

The environments are built for real with uv, from tiny projects whose one dependency is a
wheel made on the spot, offline: seconds, no download.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from tiny_packages import PROBE, PROBE_MODULE, add_wheel_dependency, make_wheel

from convnets import environment
from pipeline import environments

REPO_ROOT = Path(__file__).resolve().parents[1]


def uv() -> str:
    return environments.uv_binary()


@pytest.fixture
def envs(tmp_path, monkeypatch):
    """Run environments under tmp_path; uv offline, so nothing here can download."""
    root = tmp_path / "envs"
    monkeypatch.setenv(environments.ENVS_DIR_ENV, str(root))
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.delenv(environments.KEEP_ENV, raising=False)
    return root


def tiny_project(folder: Path, source: str = "WHO = 'probe'\n", version: str = "1.0") -> Path:
    """A project whose one dependency is a fresh wheel of `convnets-probe`, locked by uv."""
    folder.mkdir(parents=True)
    wheel = make_wheel(folder / "vendor", version=version, source=source)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
        f'dependencies = ["{PROBE}"]\n\n[tool.uv.sources]\n{PROBE} = {{ path = "vendor/{wheel.name}" }}\n'
    )
    subprocess.run([uv(), "lock", "--offline", "--quiet"], cwd=folder, check=True, env=uv_env())
    return folder


def uv_env() -> dict[str, str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


def probe_in(env: environments.RunEnvironment, checkout: Path) -> str:
    """What `import convnets_probe` gives inside the run environment, run as a stage would be."""
    proc = subprocess.run(
        [str(env.python), "-c", f"import {PROBE_MODULE}, sys; print({PROBE_MODULE}.WHO, sys.prefix)"],
        env={**os.environ, **env.variables(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def test_a_run_builds_the_environment_of_its_lock_and_the_next_run_reuses_it(envs, tmp_path):
    checkout = tiny_project(tmp_path / "clone-a")
    lines: list[str] = []
    with environments.environment_for(checkout, extras=(), on_line=lines.append) as first:
        assert first.built and first.digest == environment.lock_digest(checkout / "uv.lock")
        assert probe_in(first, checkout) == f"probe {first.path}"
        assert first.path.parent == envs
        assert environment.read_stamp(first.path) == first.digest  # the train stage records this
        assert "built" in first.summary() and first.digest[:12] in first.summary()
    # another clone of the same commit: same lock, same environment, nothing installed
    other = tmp_path / "clone-b"
    shutil.copytree(checkout, other)
    with environments.environment_for(other, extras=()) as second:
        assert not second.built and second.path == first.path
        assert "reused" in second.summary()
        assert probe_in(second, other) == f"probe {first.path}"


def test_a_changed_lock_gets_its_own_environment_with_its_own_packages(envs, tmp_path):
    old = tiny_project(tmp_path / "old", source="WHO = 'old'\n", version="1.0")
    new = tiny_project(tmp_path / "new", source="WHO = 'new'\n", version="2.0")
    with environments.environment_for(old, extras=()) as a, environments.environment_for(new, extras=()) as b:
        assert a.path != b.path and a.digest != b.digest
        assert probe_in(a, old).split()[0] == "old"
        assert probe_in(b, new).split()[0] == "new"


def test_the_run_sees_its_clones_code_first(envs, tmp_path):
    checkout = tiny_project(tmp_path / "clone")
    with environments.environment_for(checkout, extras=()) as env:
        variables = env.variables(checkout)
    assert variables["VIRTUAL_ENV"] == str(env.path)
    assert variables["PATH"].split(os.pathsep)[0] == str(env.path / "bin")
    assert variables["PYTHONPATH"].split(os.pathsep) == [str(checkout / "src"), str(checkout)]


def test_a_lock_that_cannot_be_installed_fails_naming_the_package_and_the_lock(envs, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal: uv would wrap the cause onto a line of its own
    checkout = tiny_project(tmp_path / "broken")
    for wheel in (checkout / "vendor").iterdir():
        wheel.unlink()  # the lock names a wheel that is not there
    digest = environment.lock_digest(checkout / "uv.lock")
    with pytest.raises(environments.RunEnvironmentError) as failed:
        with environments.environment_for(checkout, extras=()):
            pass
    message = str(failed.value)
    assert "\n" not in message
    assert re.search(
        rf"uv.lock {digest[:12]} cannot be installed: package convnets[-_]probe \(Distribution not found at: file:",
        message,
    ), message
    assert [p for p in envs.iterdir() if p.is_dir()] == []  # no half-built environment left
    # the same worker goes on: the next run, with a lock that installs, succeeds
    with environments.environment_for(tiny_project(tmp_path / "good"), extras=()) as env:
        assert env.built


def test_a_commit_without_a_lock_is_refused(envs, tmp_path):
    with pytest.raises(environments.RunEnvironmentError, match="has no uv.lock: run `make lock`"):
        with environments.environment_for(tmp_path, extras=()):
            pass


def test_old_environments_are_pruned_but_never_one_in_use(envs, tmp_path, monkeypatch):
    monkeypatch.setenv(environments.KEEP_ENV, "2")
    projects = [tiny_project(tmp_path / f"p{i}", source=f"WHO = '{i}'\n", version=f"1.{i}") for i in range(4)]
    with environments.environment_for(projects[0], extras=()) as held:
        os.utime(held.path / ".last-used", (1, 1))  # the least recently used, but in use
        for i, project in enumerate(projects[1:], start=1):
            with environments.environment_for(project, extras=()):
                pass
            os.utime(
                envs / environments.environment_key(environment.lock_digest(project / "uv.lock"), ()) / ".last-used",
                (1000 + i, 1000 + i),
            )
        kept = {p.name for p in envs.iterdir() if p.is_dir()}
        # the two most recently used, plus the oldest, which a run still holds
        assert held.path.name in kept and len(kept) == 3
        assert held.python.exists()
    with environments.environment_for(projects[1], extras=()) as rebuilt:  # pruned while p0 was held
        assert rebuilt.built
    kept = sorted(p.name for p in envs.iterdir() if p.is_dir())
    assert len(kept) == 2 and held.path.name not in kept


def site_packages(env: environments.RunEnvironment) -> Path:
    return environments.site_packages(env.path)


def test_nothing_is_compiled_at_build_and_a_run_writes_what_it_imports_on_first_import(envs, tmp_path, monkeypatch):
    """Compiling all of a lock's packages was most of a new lock's wait; a run compiles only what it imports."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as CI and container images set it
    monkeypatch.setenv("UV_COMPILE_BYTECODE", "1")  # as the Makefile exports it (a worker started by make)
    checkout = tiny_project(tmp_path / "clone")
    with environments.environment_for(checkout, extras=()) as env:
        assert env.built
        assert sorted(site_packages(env).rglob("*.pyc")) == []
        assert probe_in(env, checkout) == f"probe {env.path}"  # a stage's process, its first import
        written = [path.name.split(".")[0] for path in site_packages(env).rglob("*.pyc")]
        assert PROBE_MODULE in written  # despite the worker's PYTHONDONTWRITEBYTECODE: the next one reads it


def test_a_new_environment_links_the_compiled_modules_of_the_same_files_from_the_workers_own(envs, tmp_path):
    """A new lock mostly repeats the worker's packages: their .pyc come linked, not compiled again."""
    checkout = tiny_project(tmp_path / "clone")
    with environments.environment_for(checkout, extras=()) as donor:
        subprocess.run([str(donor.python), "-m", "compileall", "-q", str(site_packages(donor))], check=True)
    built = tmp_path / "same-lock"
    environments.build(checkout, built, donor.digest, (), lambda line: None)
    reused = environments.RunEnvironment(built, donor.digest, True, 0.0)
    source, twin = site_packages(donor) / f"{PROBE_MODULE}.py", site_packages(reused) / f"{PROBE_MODULE}.py"
    if not os.path.samefile(source, twin):
        pytest.skip("uv copied the files instead of linking them (another file system): nothing to link")
    assert environments.link_bytecode(built, donor.path) >= 1
    (pyc,) = (twin.parent / "__pycache__").glob(f"{PROBE_MODULE}.*.pyc")
    assert os.path.samefile(pyc, source.parent / "__pycache__" / pyc.name)
    assert probe_in(reused, checkout) == f"probe {built}"
    assert os.path.samefile(pyc, source.parent / "__pycache__" / pyc.name)  # read as it was, not compiled again

    # another version of the package (another file) and a donor that is no virtual environment: nothing
    other = tiny_project(tmp_path / "other", source="WHO = 'other'\n", version="2.0")
    with environments.environment_for(other, extras=()) as changed:
        assert environments.link_bytecode(changed.path, donor.path) == 0
        assert environments.link_bytecode(changed.path, tmp_path) == 0
        assert probe_in(changed, other).split()[0] == "other"


class Killed(BaseException):
    """The worker killed in the middle of a prune (not an Exception: nothing may catch it)."""


def test_a_prune_killed_half_way_leaves_an_environment_the_next_run_rebuilds(envs, tmp_path, monkeypatch):
    checkout = tiny_project(tmp_path / "clone")
    with environments.environment_for(checkout, extras=()) as env:
        pass
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        real_rmtree(Path(path) / "lib")  # the installed packages are gone, the rest is not
        raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(environments.shutil, "rmtree", killed_half_way)
        environments.prune(envs, 0, quiet)
    assert env.path.is_dir()  # half-deleted
    with environments.environment_for(checkout, extras=()) as again:
        assert again.built and again.path == env.path
        assert probe_in(again, checkout) == f"probe {env.path}"


# --- runs side by side on one machine (two workers sharing one user cache) -------------------

ENTER_WITHIN_S = 20  # generous for 2 busy cores; a run that waits for another's whole run never gets in


class HeldRun:
    """A run in a thread of its own, inside its environment until told to leave.

    Each call of environment_for opens the lock file anew, and flock locks belong to the open
    file, so a thread here contends exactly as another worker process on the machine would.
    """

    def __init__(self, checkout: Path) -> None:
        self.inside, self.leave, self.env = threading.Event(), threading.Event(), None
        self.thread = threading.Thread(target=self.use, args=(checkout,), daemon=True)
        self.thread.start()

    def use(self, checkout: Path) -> None:
        with environments.environment_for(checkout, extras=()) as env:
            self.env = env
            self.inside.set()
            self.leave.wait(120)

    def end(self) -> None:
        self.leave.set()
        self.thread.join(120)


@pytest.fixture
def hold():
    """Start HeldRuns; whatever a test asserts, every one of them leaves its environment at the end."""
    runs: list[HeldRun] = []

    def start(checkout: Path) -> HeldRun:
        runs.append(HeldRun(checkout))
        return runs[-1]

    yield start
    for run in runs:
        run.end()


def quiet(line: str) -> None:
    pass


def two_clones(tmp_path: Path) -> tuple[Path, Path]:
    """Two clones of one commit: the same uv.lock."""
    checkout = tiny_project(tmp_path / "clone-a")
    other = tmp_path / "clone-b"
    shutil.copytree(checkout, other)
    return checkout, other


def test_a_second_run_of_the_same_lock_uses_the_environment_while_the_first_still_holds_it(envs, tmp_path, hold):
    """The first run holds its environment for its whole training; the second must not wait for that."""
    checkout, other = two_clones(tmp_path)
    with environments.environment_for(checkout, extras=()):
        pass  # built once: what follows is the everyday case, a reused environment
    first = hold(checkout)
    assert first.inside.wait(ENTER_WITHIN_S)
    second = hold(other)
    assert second.inside.wait(ENTER_WITHIN_S), (
        f"the second run waited more than {ENTER_WITHIN_S} s, for the first run to end"
    )
    assert second.env.path == first.env.path and not first.env.built and not second.env.built


def test_runs_that_start_together_on_a_new_lock_build_it_once_and_then_share_it(envs, tmp_path, monkeypatch, hold):
    """A run that comes while another builds waits for the build, not for the builder's whole run."""
    checkout, other = two_clones(tmp_path)
    building, real_build = threading.Event(), environments.build

    def slow_build(*args, **kwargs):
        building.set()
        threading.Event().wait(1.0)  # the second run comes in meanwhile and finds no environment yet
        real_build(*args, **kwargs)

    monkeypatch.setattr(environments, "build", slow_build)
    first = hold(checkout)
    assert building.wait(ENTER_WITHIN_S)
    second = hold(other)
    assert second.inside.wait(ENTER_WITHIN_S), "the second run waited for the run that built the environment to end"
    assert first.inside.wait(ENTER_WITHIN_S)  # the builder prunes before it gets in: the second may be first
    assert [first.env.built, second.env.built] == [True, False]
    assert second.env.path == first.env.path


def test_an_environment_in_use_by_two_runs_is_not_pruned(envs, tmp_path, monkeypatch, hold):
    monkeypatch.setenv(environments.KEEP_ENV, "1")
    checkout, other = two_clones(tmp_path)
    first = hold(checkout)
    assert first.inside.wait(ENTER_WITHIN_S)
    second = hold(other)
    assert second.inside.wait(ENTER_WITHIN_S)
    os.utime(first.env.path / ".last-used", (1, 1))  # the least recently used: first in line to go
    newer = tiny_project(tmp_path / "newer", source="WHO = 'newer'\n", version="2.0")
    with environments.environment_for(newer, extras=()) as built:
        assert built.built
        assert first.env.python.exists()  # both runs still hold it
    first.end()
    assert environments.prune(envs, 1, quiet) == [] and first.env.python.exists()  # the second run holds it
    second.end()
    assert environments.prune(envs, 1, quiet) == [first.env.path.name]  # no run holds it any more


def test_a_machine_with_an_nvidia_gpu_gets_the_gpu_extra(tmp_path):
    """Without it a GPU worker would build CPU-only TensorFlow and train on the CPU, silently."""
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    (gpus / "0000:01:00.0" / "information").write_text("Model: NVIDIA H100\n")
    assert environments.machine_extras(gpus) == ("gpu",)


def test_a_machine_without_an_nvidia_gpu_gets_no_extra(tmp_path):
    assert environments.machine_extras(tmp_path / "no-driver") == ()
    (tmp_path / "driver-without-gpus").mkdir()
    assert environments.machine_extras(tmp_path / "driver-without-gpus") == ()


def store_project(folder: Path) -> Path:
    """A tiny project whose probe package comes only with its `s3` extra, as s3fs with the project's."""
    tiny_project(folder)
    pyproject = folder / "pyproject.toml"
    text = pyproject.read_text()
    probe = re.search(r'dependencies = \["([^"]+)"\]', text).group(1)
    text = text.replace(
        f'dependencies = ["{probe}"]', f'dependencies = []\n\n[project.optional-dependencies]\ns3 = ["{probe}"]'
    )
    pyproject.write_text(text)
    subprocess.run([uv(), "lock", "--offline", "--quiet"], cwd=folder, check=True, env=uv_env())
    return folder


def test_a_run_whose_params_name_an_object_store_gets_its_extra(envs, tmp_path, monkeypatch):
    """A sweep point with fetch.archive=s3://... passed the submitter's check (s3fs there): the worker
    must install the lock's `s3` extra too, in an environment of its own, or the fetch fails there."""
    monkeypatch.setattr(environments, "machine_extras", lambda: ())  # whatever GPU this machine has
    checkout = store_project(tmp_path / "clone")
    with environments.environment_for(checkout, params=["fetch.archive=s3://bucket/train.zip"]) as store:
        assert store.path.name.endswith("-s3")
        assert probe_in(store, checkout).startswith("probe ")  # the extra's package is installed
    with environments.environment_for(checkout, params=["fetch.archive=https://example.org/train.zip"]) as plain:
        assert plain.path != store.path and not plain.path.name.endswith("-s3")
    # gs:// names an extra this lock does not have: left out (the fetch stage says what to install).
    (checkout / "params.yaml").write_text("fetch:\n  mnist_url: gs://bucket/mnist.npz\n")
    with environments.environment_for(checkout, params=["fetch.archive=S3://bucket/train.zip"]) as both:
        assert both.path == store.path


def test_the_projects_own_lock_provides_the_object_store_extras():
    """The rule read against this repository's uv.lock: its params name https only, a sweep may name more."""
    assert environments.store_extras(REPO_ROOT) == ()
    overrides = ["fetch.archive=s3://bucket/train.zip", "fetch.mnist_url=gcs://bucket/mnist.npz"]
    assert environments.store_extras(REPO_ROOT, overrides) == ("gs", "s3")


def test_gpu_machines_get_the_gpu_extra_in_the_key():
    digest = "a" * 64
    assert environments.environment_key(digest, ("gpu",)).endswith("-gpu")
    assert environments.environment_key(digest, ()) != environments.environment_key(digest, ("gpu",))
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in environments.environment_key(digest, ())


# --- the project's own install: exactly the lock ---------------------------------------------


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"]}


@pytest.mark.parametrize("package", ["tensorflow", "keras", "dvc", "prefect", "tqdm", "uv"])
def test_the_installed_environment_is_exactly_the_lock(package):
    assert importlib.metadata.version(package) == locked_versions()[package]


def test_the_installed_environment_names_its_lock():
    digest = hashlib.sha256((REPO_ROOT / "uv.lock").read_bytes()).hexdigest()
    assert environment.read_stamp() == digest, "reinstall: make install"
    assert environment.describe()["lock"] == digest[:12]


def test_the_makefile_bootstraps_the_uv_of_the_lock():
    pinned = re.search(r"^UV_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert pinned == locked_versions()["uv"]


def test_make_install_refuses_a_lock_that_no_longer_matches_pyproject(tmp_path):
    for name in ("Makefile", "pyproject.toml", "uv.lock", "runtime.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n    "rich>=13",\n', 1)
    )
    uv_home = Path(environments.uv_binary()).parent.parent  # the venv's uv: no bootstrap from the index
    proc = subprocess.run(
        ["make", "install", f"UV_HOME={uv_home}"], cwd=tmp_path, capture_output=True, text=True, env=uv_env()
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert ours == ["error: uv.lock does not match pyproject.toml: run `make lock` and commit uv.lock"], proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_the_wheel_helper_writes_the_lock_uv_would(tmp_path):
    """The fleet test's dependency change must be a lock uv accepts as up to date."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    add_wheel_dependency(tmp_path, make_wheel(tmp_path / "vendor"))
    add_wheel_dependency(tmp_path, make_wheel(tmp_path / "vendor", name="convnets-other"))  # a second source
    check = subprocess.run(
        [uv(), "lock", "--check", "--offline", "--python", sys.executable],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=uv_env(),
    )
    assert check.returncode == 0, check.stderr
    locked = {package["name"] for package in tomllib.loads((tmp_path / "uv.lock").read_text())["package"]}
    assert {PROBE, "convnets-other"} <= locked
