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
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as update_params_file
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with Repo(os.fspath(project)) as repo:
        hydra = dict(repo.config.get("hydra", {}))
    path_overrides = to_path_overrides(overrides)
    if hydra.get("enabled"):
        # As `dvc exp run`: with Hydra on, params.yaml is always rebuilt from conf/.
        path_overrides.setdefault(DEFAULT_PARAMS_FILE, [])
    for path, file_overrides in path_overrides.items():
        target = os.fspath(project / path)
        try:
            if hydra.get("enabled") and path == DEFAULT_PARAMS_FILE:
                compose_and_dump(target, *hydra_sources(project, hydra), file_overrides)
            else:
                update_params_file(target, file_overrides)
        except (HydraException, DvcException, OmegaConfBaseException) as exc:
            raise OverridesError(f"cannot apply {file_overrides} to {path}: {one_line(exc)}") from None
    return list(path_overrides)


def compose_params(project: Path, overrides: Sequence[str], target: Path) -> None:
    """Write to `target` the params.yaml that `overrides` would give, leaving the project as it is."""
    import shutil

    project = project.resolve()
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides as update_params_file
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with Repo(os.fspath(project)) as repo:
        hydra = dict(repo.config.get("hydra", {}))
    try:
        if hydra.get("enabled"):
            compose_and_dump(os.fspath(target), *hydra_sources(project, hydra), list(overrides))
        else:
            shutil.copyfile(project / DEFAULT_PARAMS_FILE, target)
            update_params_file(os.fspath(target), list(overrides))
    except (HydraException, DvcException, OmegaConfBaseException) as exc:
        raise OverridesError(f"cannot apply {list(overrides)}: {one_line(exc)}") from None


def hydra_sources(project: Path, hydra: dict) -> tuple[str | None, str | None, str, str]:
    """config_dir, config_module, config_name, plugins_path as `dvc exp run` reads them."""
    module = hydra.get("config_module")
    config_dir = None if module else os.fspath(project / hydra.get("config_dir", "conf"))
    return config_dir, module, hydra.get("config_name", "config"), os.fspath(project / hydra.get("plugins_path", ""))


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
