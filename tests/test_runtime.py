"""The environment is a dependency: runtime.yaml, each stage's packages, and the check every stage runs.

The failure behind it (issue 24): after a commit that changed only uv.lock (a TensorFlow
upgrade) `dvc status` said everything was up to date, and a worker restored `train` from a
run cache made under the old lock. Now the stages' params include their packages' versions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, copy_working_tree, venv_env
from convnets import cli, runtime, runtime_lock
from convnets.errors import PipelineError

TENSORFLOW = re.compile(r'(\[\[package\]\]\nname = "tensorflow"\nversion = ")([^"]+)(")')


def lock_copy(tmp_path: Path) -> Path:
    """The files runtime_lock reads, copied: uv.lock, dvc.yaml and the source."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("uv.lock", "dvc.yaml", "runtime.yaml"):
        shutil.copy2(REPO_ROOT / name, project / name)
    shutil.copytree(REPO_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return project


def upgrade_tensorflow(lock: Path, version: str = "2.99.0") -> None:
    text, count = TENSORFLOW.subn(rf"\g<1>{version}\g<3>", lock.read_text())
    assert count == 1, "uv.lock has no tensorflow entry to change"
    lock.write_text(text)


def add_dev_tool(lock: Path) -> None:
    """What `make lock` does to uv.lock when pyproject.toml's test extra gains tomli-w."""
    text = lock.read_text()
    text = text.replace(
        'test = [\n    { name = "psutil" },', 'test = [\n    { name = "psutil" },\n    { name = "tomli-w" },', 1
    )
    text += '\n[[package]]\nname = "tomli-w"\nversion = "1.2.0"\nsource = { registry = "https://pypi.org/simple" }\n'
    lock.write_text(text)


def changed_sections(before: dict, after: dict) -> set[str]:
    return {key for key in set(before) | set(after) if before.get(key) != after.get(key)}


def test_the_committed_runtime_file_matches_the_lock_and_the_imports():
    assert runtime_lock.stale_reason(REPO_ROOT) is None, "run `make lock` and commit runtime.yaml"


def test_each_stage_lists_what_it_imports_and_what_that_needs():
    written = runtime.read_runtime(REPO_ROOT / "runtime.yaml")
    assert {"tensorflow", "keras", "numpy", "h5py", "ml-dtypes", "dvclive"} <= set(written["train"])
    assert {"scikit-learn", "scipy", "pandas"} <= set(written["split"])
    assert "tensorflow" not in written["split"] and "pytest" not in written["train"]
    assert not any("pytest" in packages or "ruff" in packages for key, packages in written.items() if key != "python")


def test_a_tensorflow_upgrade_changes_the_stages_that_import_it_and_only_those(tmp_path):
    project = lock_copy(tmp_path)
    before = runtime_lock.build_runtime(project)
    upgrade_tensorflow(project / "uv.lock")
    after = runtime_lock.build_runtime(project)
    assert changed_sections(before, after) == {"train", "evaluate", "report"}
    assert after["train"]["tensorflow"] == "2.99.0"


def test_a_new_dev_tool_changes_nothing(tmp_path):
    project = lock_copy(tmp_path)
    before = runtime_lock.build_runtime(project)
    add_dev_tool(project / "uv.lock")
    assert "tomli-w" in (project / "uv.lock").read_text()
    assert runtime_lock.build_runtime(project) == before


def test_a_stale_runtime_file_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    project = lock_copy(tmp_path)
    upgrade_tensorflow(project / "uv.lock")
    monkeypatch.chdir(project)
    assert runtime_lock.main(["check"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tensorflow" in error and "make lock" in error
    assert runtime_lock.main(["write"]) == 0
    assert runtime_lock.main(["check"]) == 0


def test_an_import_that_no_locked_package_provides_is_named(tmp_path):
    project = lock_copy(tmp_path)
    split = project / "src" / "convnets" / "split.py"
    split.write_text(split.read_text() + "\n\ndef later():\n    import tomli_w\n")
    with pytest.raises(runtime_lock.RuntimeLockError, match="stage split imports tomli_w"):
        runtime_lock.build_runtime(project)


def test_the_installed_environment_is_the_locked_one():
    written = runtime.read_runtime(REPO_ROOT / "runtime.yaml")
    assert all(runtime.differences(written, stage) == [] for stage in written if stage != "python")


def test_another_version_or_python_is_named():
    written = {"python": "2.7", "train": {"numpy": "0.0.1", "keras": runtime.installed_version("keras")}}
    found = runtime.differences(written, "train")
    assert found[0].startswith(f"Python {runtime.python_minor()} runs, 2.7 locked")
    assert found[1:] == [f"numpy {runtime.installed_version('numpy')}, 0.0.1 locked"]


def test_a_missing_package_counts_on_the_locked_platform_only():
    written = {"python": runtime.python_minor(), "train": {"no-such-package": "1.0"}}
    assert runtime.differences(written, "train", platform="linux") == ["no-such-package not installed, 1.0 locked"]
    assert runtime.differences(written, "train", platform="darwin") == []


def test_a_stage_refuses_to_run_in_another_environment(tmp_path, capsys):
    (tmp_path / "runtime.yaml").write_text(
        yaml.safe_dump({"python": runtime.python_minor(), "test_runtime": {"numpy": "0.1"}})
    )
    params = tmp_path / "params.yaml"
    shutil.copy2(REPO_ROOT / "params.yaml", params)
    ran = []  # the work function's module names the stage: here this test module
    code = cli.stage_main("probe", [], lambda params, args: ran.append(1), ["--params", str(params)])
    assert code == 1 and not ran
    assert "stage test_runtime runs in another environment" in capsys.readouterr().err


def test_under_python_m_the_stage_is_named_after_its_module(tmp_path):
    (tmp_path / "runtime.yaml").write_text(
        yaml.safe_dump({"python": runtime.python_minor(), "split": {"numpy": "0.1"}})
    )
    shutil.copy2(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    command = ["python", "-m", "convnets.split", "raw", "split", "--params", str(tmp_path / "params.yaml")]
    out = subprocess.run(
        command, cwd=tmp_path, env={**venv_env(), "PYTHONPATH": str(REPO_ROOT / "src")}, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: stage split runs in another environment than runtime.yaml locks: numpy")
    assert not (tmp_path / "split").exists()


def test_mismatch_is_a_pipeline_error():
    assert issubclass(runtime.RuntimeMismatch, PipelineError)


@pytest.mark.slow
def test_dvc_status_names_the_stages_a_lock_change_reruns(tmp_path):
    """Right after `make lock`: a TensorFlow change shows train, evaluate and report; a dev tool nothing."""
    project = copy_working_tree(tmp_path / "project")
    env = {**venv_env(), "PYTHONPATH": "src"}

    def status() -> dict[str, set[str]]:
        out = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        changed: dict[str, set[str]] = {}
        for stage, entries in json.loads(out.stdout or "{}").items():
            for entry in entries:
                if isinstance(entry, dict) and "runtime.yaml" in entry.get("changed deps", {}):
                    changed.setdefault(stage, set()).add("runtime.yaml")
        return changed

    def relock() -> None:
        subprocess.run(["python", "-m", "convnets.runtime_lock", "write"], cwd=project, env=env, check=True)

    assert status() == {}
    add_dev_tool(project / "uv.lock")
    relock()
    assert status() == {}
    upgrade_tensorflow(project / "uv.lock")
    relock()
    assert set(status()) == {"train", "evaluate", "report"}
