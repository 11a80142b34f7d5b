"""Whether an experiment can leave the data stages' outputs out of its clone.

`dvc exp run --allow-missing` skips a stage whose outputs are absent but which is otherwise
unchanged against dvc.lock, instead of pulling its outputs, and a stage that runs pulls the
deps it reads: a point whose first changed stage is `train` pulls `data/prepared` and never
fetch's photos. But when a data stage is *not* unchanged (a point that changes the split),
DVC 3.67 still skips the stages above it without pulling their outputs, then runs or restores
the changed one, and the stage after it reads a `data/raw` that is not there (seen in the
fleet test). So the flag is only safe when no data stage will run or be restored at all.

locked_data_reused lets DVC answer before `dvc exp run` starts: in a scratch copy with the
point's params, every data stage must pass the check DVC's repro makes under --allow-missing
(Stage.changed: command, deps' hashes, params, locked deps against the locked outputs above;
absent data aside) and have every output it declares in dvc.lock (unlocked_outs).

A sweep's points mostly change params of the data stages too (all points of a group share
them), so the commit's own lock rarely fits. The group's data-stage run hands its dvc.lock
entries over instead (stage_entries there, adopt_entries in each point's clone): they
describe exactly what that run pushed, and locked_data_reused still checks them against
the point's params and the clone's code before DVC relies on them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"
DVC_FILE = "dvc.yaml"


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
    """True when the clone's dvc.lock holds every data stage exactly as this point would run it."""
    if not data_stages or not (checkout / LOCK_FILE).is_file():
        return False
    # DVC reads params.yaml from its workspace, so it must see the point's composed one. Not in
    # the clone: without -S (a point of defaults) `dvc exp run` leaves params.yaml as committed,
    # and with Hydra off it applies -S to the file it finds, so a composed file left there could
    # change the experiment. A scratch project of only what the check reads (dvc.yaml, dvc.lock,
    # the params files, the stages' own deps) leaves the clone as the run expects it.
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        copy_stage_inputs(checkout, scratch, overrides, data_stages)
        return not changed_stages(scratch, data_stages)


def copy_stage_inputs(checkout: Path, scratch: Path, overrides: Sequence[str], stages: Sequence[str]) -> None:
    """Into `scratch`: what DVC reads to tell whether `stages` changed, params.yaml as the point's."""
    from pipeline.overrides import compose_params

    declared = yaml.safe_load((checkout / DVC_FILE).read_text(encoding="utf-8"))["stages"]
    # Another stage's outputs stay out: absent from a fresh clone anyway (DVC then compares the
    # locked hashes with that stage's outs, `upstream`), and large where they are not.
    produced = [out for stage in declared.values() for out in paths(stage.get("outs", []))]
    deps = {dep for stage in stages for dep in paths(declared[stage].get("deps", []))}
    params = {name for stage in stages for name in params_files(declared[stage].get("params", []))}
    for name in {DVC_FILE, LOCK_FILE} | params - {PARAMS_FILE} | deps:
        if not any(is_within(name, out) for out in produced):
            copy_path(checkout / name, scratch / name)
    compose_params(checkout, list(overrides), scratch / PARAMS_FILE)


def copy_path(source: Path, target: Path) -> None:
    """A file or folder as it is; nothing for a missing one (DVC sees it missing, as in the clone)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.is_file():
        shutil.copy2(source, target)


def changed_stages(project: Path, names: Sequence[str]) -> list[str]:
    """The stages of `names` that `dvc repro --allow-missing` would run or restore in `project`."""
    from dvc.repo import Repo

    (project / ".dvc").mkdir()
    # No git in the scratch project; DVC's hash and index databases go with it, not to /var/tmp.
    config = {"core": {"no_scm": True, "site_cache_dir": str(project / ".dvc" / "site")}}
    with Repo(str(project), config=config) as repo, repo.lock:
        # One load of dvc.yaml and dvc.lock for all stages (a target per stage reparses both).
        stages = [stage for stage in repo.stage.collect(str(project / DVC_FILE)) if stage.name in names]
        return [
            stage.name for stage in stages if stage.changed(allow_missing=True, upstream=stages) or unlocked_outs(stage)
        ]


def unlocked_outs(stage) -> bool:
    """An output dvc.lock does not record (a new one, or no entry): the stage must run to make it.

    DVC 3.67.1's changed_outs(allow_missing=True) skips every absent output as merely missing,
    even one without a locked hash: it would call such a stage unchanged and never make it.
    """
    return any(not out.hash_info for out in stage.outs)


def params_files(entries: list) -> list[str]:
    """The params files a stage reads: params.yaml for bare keys, the named ones otherwise."""
    return sorted({PARAMS_FILE if isinstance(entry, str) else next(iter(entry)) for entry in entries})


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
