"""The project modules a stage runs, read from the source without importing it.

A stage's `deps` in dvc.yaml must list every file of the package whose code
can decide its outputs, or DVC calls the stage up to date after that code
changed. `import_closure` follows the `import` statements of a module
(top-level and inside functions: a lazy import runs too) through the
package, and tests/test_dvc_deps.py compares the result with dvc.yaml.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PACKAGE = "convnets"
_MODULE_FLAG = re.compile(r"(?:^|\s)-m\s+(\S+)")


def stage_modules(dvc_yaml: str | Path) -> dict[str, str]:
    """{stage: the module its cmd runs with `python -m`}."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    modules = {}
    for name, stage in stages.items():
        match = _MODULE_FLAG.search(stage["cmd"])
        if match:
            modules[name] = match.group(1)
    return modules


def module_file(module: str, src: Path) -> Path | None:
    """The file of a project module (a package's __init__.py), None for anything else."""
    if module.split(".")[0] != PACKAGE:
        return None
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            # `from convnets import fetch` imports the module convnets.fetch.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str, src: str | Path) -> set[Path]:
    """The files of the project modules that importing `module` runs, itself and packages included."""
    src = Path(src)
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]), src)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(path))
    return seen
