"""Whether an experiment can leave the data stages' outputs out of its clone.

`dvc exp run --allow-missing` skips a stage whose outputs are absent but which is otherwise
unchanged against dvc.lock, instead of pulling its outputs, and a stage that runs pulls the
deps it reads: a point whose first changed stage is `train` pulls `data/prepared` and never
fetch's photos. But when a data stage is *not* unchanged (a point that changes the split),
DVC 3.67 still skips the stages above it without pulling their outputs, then runs or restores
the changed one, and the stage after it reads a `data/raw` that is not there (seen in the
fleet test). So the flag is only safe when no data stage will run or be restored at all.

locked_data_reused answers that from the clone before DVC starts: every data stage has an
entry in the commit's dvc.lock with the same command, outputs, declared deps, code (the md5
of each file dep that is not another data stage's output) and the point's params.

A sweep's points mostly change params of the data stages too (all points of a group share
them), so the commit's own lock rarely fits. The group's data-stage run hands its dvc.lock
entries over instead (stage_entries there, adopt_entries in each point's clone): they
describe exactly what that run pushed, and locked_data_reused still checks them against
the point's params and the clone's code before DVC relies on them.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"


def stage_entries(checkout: Path, stages: Sequence[str]) -> dict[str, dict]:
    """The clone's dvc.lock entries of `stages` (after they ran or were restored there)."""
    locked = (yaml.safe_load((checkout / LOCK_FILE).read_text(encoding="utf-8")) or {}).get("stages", {})
    return {stage: locked[stage] for stage in stages if stage in locked}


def adopt_entries(checkout: Path, entries: dict[str, dict]) -> None:
    """Put another run's dvc.lock entries of some stages into the clone's dvc.lock, the rest kept."""
    path = checkout / LOCK_FILE
    lock = (yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None) or {}
    lock.setdefault("schema", "2.0")
    lock.setdefault("stages", {}).update(entries)
    path.write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


def locked_data_reused(checkout: Path, overrides: Sequence[str], data_stages: Sequence[str]) -> bool:
    """True when the commit's dvc.lock holds every data stage exactly as this point would run it."""
    from pipeline.overrides import compose_params

    if not data_stages:
        return False
    lock_file, dvc_file = checkout / LOCK_FILE, checkout / "dvc.yaml"
    if not lock_file.is_file():
        return False
    locked = (yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    declared = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / PARAMS_FILE
        compose_params(checkout, list(overrides), target)
        params = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
    produced = [out["path"] for stage in data_stages for out in (locked.get(stage) or {}).get("outs", [])]
    return all(stage_unchanged(checkout, declared[stage], locked.get(stage), params, produced) for stage in data_stages)


def stage_unchanged(checkout: Path, declared: dict, locked: dict | None, params: dict, produced: list[str]) -> bool:
    """Whether DVC would find the stage unchanged with these params (its outputs aside)."""
    if not locked or locked.get("cmd") != declared.get("cmd"):
        return False
    if sorted(out["path"] for out in locked.get("outs", [])) != sorted(paths(declared.get("outs", []))):
        return False
    deps = locked.get("deps", [])
    if sorted(dep["path"] for dep in deps) != sorted(paths(declared.get("deps", []))):
        return False
    code = [dep for dep in deps if not any(is_within(dep["path"], out) for out in produced)]
    if any(file_md5(checkout / dep["path"]) != dep.get("md5") for dep in code):
        return False  # another data stage's outputs are checked there; these are the stage's own files
    locked_params = locked.get("params", {})
    if sorted(locked_params) != sorted(params_files(declared.get("params", []))):
        return False
    values = locked_params.get(PARAMS_FILE, {})
    if sorted(values) != sorted(param_keys(declared.get("params", []))):
        return False
    if not all(lookup(params, key) == value for key, value in values.items()):
        return False
    # Other params files (runtime.yaml) are not composed from overrides: the clone's own file counts.
    return all(
        other_file_unchanged(checkout, name, values) for name, values in locked_params.items() if name != PARAMS_FILE
    )


def params_files(entries: list) -> list[str]:
    """The params files a stage reads: params.yaml for bare keys, the named ones otherwise."""
    return sorted({PARAMS_FILE if isinstance(entry, str) else next(iter(entry)) for entry in entries})


def other_file_unchanged(checkout: Path, name: str, values: dict) -> bool:
    path = checkout / name
    if not path.is_file():
        return False
    content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return all(lookup(content, key) == value for key, value in values.items())


def paths(entries: list) -> list[str]:
    """dvc.yaml's deps/outs entries: a path, or {path: options}."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def param_keys(entries: list) -> list[str]:
    """dvc.yaml's params entries of params.yaml: a key, or {params.yaml: [keys]} (other files: none)."""
    keys: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            keys.extend(entry.get(PARAMS_FILE, []))
    return keys


def lookup(params: dict, key: str):
    value = params
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def file_md5(path: Path) -> str | None:
    """The md5 DVC 3 records for a file (of its bytes as they are); None for a missing file or a folder."""
    if not path.is_file():
        return None
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
