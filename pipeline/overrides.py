"""`-S` overrides written into the params files exactly as `dvc exp run -S` writes them.

`dvc exp run` = apply the `-S` overrides, `dvc repro`, `dvc exp save` (DVC's docs). The flow
runs the repro one stage at a time, so it does the first and last steps itself: this
module calls the same DVC functions `dvc exp run` calls (Hydra composition of params.yaml
from conf/ when `hydra.enabled`, a plain key update otherwise), so a flow run and a
`dvc exp run` with the same overrides give the same params.yaml.

params.yaml is committed: an override that would put a secret there (a URL with
credentials, an interpolation) is refused before anything is written (refuse_secrets).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from convnets.params import credentials_refusal, url_credentials

DEFAULT_PARAMS_FILE = "params.yaml"
# Every place a URL starts in an override's text, overlapping (a lookahead), so that the second
# URL of a sweep `a,b` is read as well as the first; a URL ends at a space, a quote or a bracket.
URL_STARTS = re.compile(r"(?=([A-Za-z][A-Za-z0-9+.-]*://[^\s'\"\[\]{}]*))")
# A key as refusals show it: dotted names, a params file's `path:` prefix, Hydra's +/~ marks.
PLAIN_KEY = re.compile(r"[+~]*[\w.:/-]+")
INTERPOLATION = "${"
# Hydra's escapes: a sweep's points come back as `fetch.archive=https\://host/...`.
HYDRA_ESCAPE = re.compile(r"\\(.)")


class OverridesError(ValueError):
    """An override that DVC/Hydra cannot apply (bad syntax, unknown key, unknown preset)."""


def secret_in(override: str) -> str | None:
    """One line on why `override` would write a secret into params.yaml, without the secret; None if it would not.

    A URL with credentials would be committed as it is; an interpolation (`${oc.env:...}`) is
    resolved when DVC composes params.yaml, so whatever it reads would be committed too.
    """
    text = HYDRA_ESCAPE.sub(r"\1", override)
    if INTERPOLATION in text:
        return (
            f"{override_name(override)}: an interpolation (${{...}}) is resolved when DVC composes params.yaml, "
            "so what it reads (an environment variable, a secret) would be written into params.yaml and git: "
            "give the value itself; credentials are read from ~/.netrc and the environment when downloading"
        )
    for match in URL_STARTS.finditer(text):
        found = url_credentials(match.group(1))
        if found:
            return f"{override_name(override)}: {credentials_refusal(found)}"
    return None


def override_name(override: str) -> str:
    """How a refusal names an override: by its key, never its value (where the secret is)."""
    key, assigns, _ = override.partition("=")
    return f"-S {key}=..." if assigns and PLAIN_KEY.fullmatch(key) and "://" not in key else "an -S override"


def refuse_secrets(overrides: Sequence[str]) -> None:
    """OverridesError, in one line without the secret, for the first override that would commit one."""
    for override in overrides:
        problem = secret_in(override)
        if problem:
            raise OverridesError(problem)


def apply_overrides(project: Path, overrides: Sequence[str]) -> list[str]:
    """Write `overrides` into the project's params files; return the files written."""
    from dvc.utils.cli_parse import to_path_overrides

    refuse_secrets(overrides)
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

    refuse_secrets(overrides)
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
