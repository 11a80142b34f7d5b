"""`pipeline/` reads top-down: entry points and flows on top, fan-out and waiting below them,
the DVC, git and Prefect helpers at the bottom; no import goes back up, and every module
imports on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convnets.codedeps import imported_modules

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
MODULES = sorted(path.stem for path in PIPELINE.glob("*.py"))

# Lower numbers may import higher ones, never the reverse; within a layer, no cycles.
LAYERS = {
    "__main__": 0,
    "flows": 1,
    "sweep": 2,
    "nightly": 2,
    "tasks": 2,
    "waiting": 3,
}
BOTTOM = 4  # every other module: dvc, dag, workspace, environments, experiment, grid, results, prefect_api, ...


def pipeline_imports(module: str) -> set[str]:
    """The pipeline modules `module` imports, anywhere in the file (inside functions too)."""
    names = imported_modules(PIPELINE / f"{module}.py")
    return {name.split(".")[1] for name in names if name.startswith("pipeline.")} & set(MODULES) - {module}


def layer(module: str) -> int:
    return LAYERS.get(module, BOTTOM)


@pytest.mark.parametrize("module", MODULES)
def test_no_import_goes_back_up(module):
    upward = [other for other in pipeline_imports(module) if layer(other) < layer(module)]
    assert upward == [], f"pipeline/{module}.py imports {upward}, which sit above it"


def test_the_imports_have_no_cycle():
    graph = {module: pipeline_imports(module) & set(MODULES) for module in MODULES}
    visiting, done = set(), set()

    def visit(module: str, path: list[str]) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join([*path, module])
        visiting.add(module)
        for other in sorted(graph[module]):
            visit(other, [*path, module])
        visiting.discard(module)
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_every_module_imports_on_its_own():
    script = "import importlib, sys; importlib.import_module('pipeline.' + sys.argv[1])"
    failed = {}
    for module in MODULES:
        if module == "__main__":
            continue
        proc = subprocess.run([sys.executable, "-c", script, module], capture_output=True, text=True)
        if proc.returncode != 0:
            failed[module] = proc.stderr.strip().splitlines()[-1]
    assert failed == {}
