"""`-S` overrides written into the params files exactly as `dvc exp run -S` writes them.

`dvc exp run` = apply the `-S` overrides, `dvc repro`, `dvc exp save` (DVC's docs). The flow
runs the repro one stage at a time, so it does the first and last steps itself: this
module calls the same DVC functions `dvc exp run` calls (Hydra composition of params.yaml
from conf/ when `hydra.enabled`, a plain key update otherwise), so a flow run and a
`dvc exp run` with the same overrides give the same params.yaml.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PARAMS_FILE = "params.yaml"


class OverridesError(ValueError):
    """An override that DVC/Hydra cannot apply (bad syntax, unknown key, unknown preset)."""


def apply_overrides(project: Path, overrides: Sequence[str]) -> list[str]:
    """Write `overrides` into the project's params files; return the files written."""
    from dvc.utils.cli_parse import to_path_overrides

    project = project.resolve()
    hydra = hydra_config(project)
    path_overrides = to_path_overrides(overrides)
    if hydra.get("enabled"):
        # As `dvc exp run`: with Hydra on, params.yaml is always rebuilt from conf/.
        path_overrides.setdefault(DEFAULT_PARAMS_FILE, [])
    for path, file_overrides in path_overrides.items():
        write_params_file(project, hydra, path, file_overrides, project / path)
    return list(path_overrides)


def compose_params(project: Path, overrides: Sequence[str], target: Path) -> None:
    """Write to `target` the params.yaml that `overrides` would give, leaving the project as it is."""
    import shutil

    project = project.resolve()
    hydra = hydra_config(project)
    if not hydra.get("enabled"):
        shutil.copyfile(project / DEFAULT_PARAMS_FILE, target)
    write_params_file(project, hydra, DEFAULT_PARAMS_FILE, list(overrides), target)


def write_params_file(project: Path, hydra: dict, path: str, overrides: list[str], target: Path) -> None:
    """Compose params.yaml from conf/ (Hydra on) or update the params file `target` in place."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides as update_params_file
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if hydra.get("enabled") and path == DEFAULT_PARAMS_FILE:
            compose_and_dump(os.fspath(target), *hydra_sources(project, hydra), overrides)
        else:
            update_params_file(os.fspath(target), overrides)
    except (HydraException, DvcException, OmegaConfBaseException) as exc:
        raise OverridesError(f"cannot apply {overrides} to {path}: {one_line(exc)}") from None


def hydra_config(project: Path) -> dict:
    """The `hydra` section of the project's DVC config (all levels merged)."""
    from dvc.repo import Repo

    with Repo(os.fspath(project)) as repo:
        return dict(repo.config.get("hydra", {}))


def hydra_enabled(project: Path) -> bool:
    return bool(hydra_config(project).get("enabled"))


def hydra_sources(project: Path, hydra: dict) -> tuple[str | None, str | None, str, str]:
    """config_dir, config_module, config_name, plugins_path as `dvc exp run` reads them."""
    module = hydra.get("config_module")
    config_dir = None if module else os.fspath(project / hydra.get("config_dir", "conf"))
    return config_dir, module, hydra.get("config_name", "config"), os.fspath(project / hydra.get("plugins_path", ""))


def one_line(exc: BaseException) -> str:
    """The message on one line, without Hydra's search-path dump (local folders, no help to the user)."""
    return " ".join(str(exc).split()).split(" Config search path:")[0]
