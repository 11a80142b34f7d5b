"""dvc.yaml lists, for every stage, exactly the project modules its command runs.

The closure is read from the source (convnets.codedeps): the module in the
stage's `python -m` and every project module it imports, at the top or inside
a function. A file missing from `deps` would let DVC call the stage up to date
after a change that decides its outputs; a file listed but never imported
would rerun it for nothing.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT
from convnets.codedeps import import_closure, stage_modules

SRC = REPO_ROOT / "src"
STAGES = stage_modules(REPO_ROOT / "dvc.yaml")


def listed_code(stage: str) -> set[str]:
    deps = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
    return {dep for dep in deps if dep.startswith("src/")}


def closure(module: str) -> set[str]:
    return {path.relative_to(REPO_ROOT).as_posix() for path in import_closure(module, SRC)}


def test_every_stage_runs_a_module():
    assert set(STAGES) == {"fetch", "split", "preprocess", "train", "evaluate", "report"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_are_the_import_closure(stage):
    imported, listed = closure(STAGES[stage]), listed_code(stage)
    missing, unused = sorted(imported - listed), sorted(listed - imported)
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but its deps do not list them"
    assert not unused, f"dvc.yaml: stage {stage} lists {unused} in deps but never imports them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = {f"src/{module.replace('.', '/')}.py" for name, module in STAGES.items() if name != stage}
    shared = sorted(closure(STAGES[stage]) & others)
    assert not shared, f"stage {stage} imports the module of another stage: {shared} (constants go to layout.py)"


def test_closure_follows_lazy_and_nested_imports(tmp_path):
    package = tmp_path / "convnets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from convnets.b import x\n")
    (package / "b.py").write_text("from convnets import c\nimport numpy\nx = 1\n")
    (package / "c.py").write_text("")
    (package / "unused.py").write_text("")
    assert {p.name for p in import_closure("convnets.a", tmp_path)} == {"__init__.py", "a.py", "b.py", "c.py"}


def test_report_stage_loads_no_tensorflow():
    """The report stage reads files; TensorFlow would add seconds and a dependency it does not need."""
    import subprocess
    import sys

    probe = "import sys, convnets.report; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": "src"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "False"]
