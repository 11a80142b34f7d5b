"""Each run in its own commit's environment: built from the run's uv.lock, kept on the worker, reused.

A worker is started once. For every flow run it builds, or finds already built, the virtual
environment of the run's own `uv.lock` (`uv sync --frozen --no-install-project`), kept in the
worker's user cache under a key of the lock's SHA-256, the Python version and the extras:
`gpu` on a machine with an NVIDIA GPU, and `s3` or `gs` when the run's params (the commit's
params.yaml and presets, the run's overrides) name a URL that the extra's filesystem reads (s3fs,
gcsfs): the submitter's check passed it with the submitter's packages. The run's DVC, and so its
stages, run with that environment's `python`; the project's code comes from the run's clone (the
stage commands put `src` on PYTHONPATH), so one environment serves every commit with the same lock.

uv installs from its own cache by hard links where the file system allows, so a second
environment of the same packages costs seconds and little disk. Nothing is compiled to bytecode
at build (compiling all 237 packages took 30 to 76 s on 2 cores, most of a new lock's wait, for
modules no stage imports). Where the worker's own environment holds the very same source file
(the same file of uv's cache, linked into both), its `.pyc` is linked in too (`link_bytecode`):
a new lock usually changes a few packages, and the others import at once. The rest is compiled
by the run's processes on first import, whatever PYTHONDONTWRITEBYTECODE says on the worker
(see `variables`).

Concurrency (two workers on one machine share its user cache): a run holds a shared lock
(flock) on its environment's `<key>.lock` from before it looks for the environment until it
ends, so any number of runs use one environment at once, and pruning, which deletes only
environments whose exclusive lock it gets, never removes one in use. Building takes a second
lock, `<key>.build`, exclusively: two runs never build one environment at once, and a run that
finds no environment waits for the build only, never for another run's training. (One lock
file converted between shared and exclusive would not do: flock's conversions are not atomic,
and a run queued for the exclusive lock would wait behind the builder's shared lock until the
builder's run ended.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from convnets.downloads import filesystem_extra
from convnets.environment import SHORT, lock_digest, write_stamp
from convnets.layout import user_cache_dir

ENVS_DIR_ENV = "CONVNETS_ENVS_DIR"  # where the run environments go (default: the user cache)
KEEP_ENV = "CONVNETS_KEEP_ENVS"  # how many environments a worker keeps (default below)
DEFAULT_KEEP = 3
LOCK_FILE = "uv.lock"
COMPLETE = ".complete"  # written last: an environment without it is a broken build
LAST_USED = ".last-used"  # touched by every run: pruning keeps the most recently used
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU where NVIDIA's driver is loaded
BYTECODE_ENV = "PYTHONDONTWRITEBYTECODE"
URL_SCHEME = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://")  # s3://bucket/... in a params text


class RunEnvironmentError(RuntimeError):
    """The run's environment cannot be built: no uv.lock, or uv cannot install it."""


@dataclass(frozen=True)
class RunEnvironment:
    path: Path
    digest: str  # the lock's SHA-256
    built: bool  # False: an environment already there was reused
    seconds: float

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def variables(self, checkout: Path) -> dict[str, str]:
        """What `dvc` needs to run in this environment: it, activated, and the clone's code first."""
        return {
            "VIRTUAL_ENV": str(self.path),
            "PATH": str(self.path / "bin") + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join([str(checkout / "src"), str(checkout)]),
            # Empty is unset for Python (these variables are laid over the worker's, so they cannot
            # remove one): the environment is the worker's own and holds no bytecode from its build,
            # so where CI or a container image sets PYTHONDONTWRITEBYTECODE every stage process would
            # compile TensorFlow's and DVC's imports again. The first import writes them, once.
            BYTECODE_ENV: "",
        }

    def summary(self) -> str:
        verb = "built" if self.built else "reused"
        return f"environment of uv.lock {self.digest[:SHORT]} {verb} in {self.seconds:.1f} s ({self.path})"


def envs_root() -> Path:
    root = Path(os.environ.get(ENVS_DIR_ENV) or user_cache_dir() / "envs").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def keep_count() -> int:
    text = os.environ.get(KEEP_ENV, "")
    return max(1, int(text)) if text.isdigit() else DEFAULT_KEEP


def machine_extras(gpus: Path = NVIDIA_GPUS) -> tuple[str, ...]:
    """('gpu',) on a machine with an NVIDIA GPU and driver: TensorFlow with its CUDA libraries."""
    has_gpu = gpus.is_dir() and any(gpus.iterdir())
    return ("gpu",) if has_gpu else ()


def run_extras(checkout: Path, params: Sequence[str] = ()) -> tuple[str, ...]:
    """The extras of a run's environment: the machine's (gpu) and those of the object stores it reads."""
    return (*machine_extras(), *store_extras(checkout, params))


def store_extras(checkout: Path, params: Sequence[str] = ()) -> tuple[str, ...]:
    """The lock's extras that install a filesystem for an object-store URL the run may fetch (s3:// -> s3).

    Looked for in the commit's params.yaml and presets (conf/) and in `params`, the run's own
    (its overrides, or the params.yaml a parent run shipped). An extra the lock lacks is left
    out: the build would fail, and the fetch stage names what to install.
    """
    texts = [*params, *(path.read_text(encoding="utf-8", errors="replace") for path in params_files(checkout))]
    schemes = {scheme.lower() for text in texts for scheme in URL_SCHEME.findall(text)}
    wanted = {filesystem_extra(scheme) for scheme in schemes} - {None}
    return tuple(sorted(wanted & lock_extras(checkout / LOCK_FILE))) if wanted else ()


def params_files(checkout: Path) -> list[Path]:
    files = [checkout / "params.yaml", *sorted((checkout / "conf").rglob("*.yaml"))]
    return [path for path in files if path.is_file()]


def lock_extras(lock: Path) -> set[str]:
    """The extras the lock's own project provides (uv.lock's `provides-extras`)."""
    for package in tomllib.loads(lock.read_text(encoding="utf-8")).get("package", []):
        if set(package.get("source", {}).items()) & {("editable", "."), ("virtual", ".")}:
            return set(package.get("metadata", {}).get("provides-extras", []))
    return set()


def environment_key(digest: str, extras: tuple[str, ...]) -> str:
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return "-".join([digest[:16], python, *sorted(extras)])


@contextlib.contextmanager
def environment_for(
    checkout: Path,
    extras: tuple[str, ...] | None = None,
    on_line: Callable[[str], None] = lambda line: None,
    params: Sequence[str] = (),
) -> Iterator[RunEnvironment]:
    """The environment of `checkout`'s uv.lock, built or reused, held (not prunable) until exit.

    extras: None for the run's (run_extras, which reads `params`: the run's overrides, or the
    params.yaml its parent run shipped).
    """
    lock = checkout / LOCK_FILE
    if not lock.is_file():
        raise RunEnvironmentError(f"the commit has no {LOCK_FILE}: run `make lock` and commit it")
    digest = lock_digest(lock)
    extras = run_extras(checkout, params) if extras is None else tuple(extras)
    root = envs_root()
    key = environment_key(digest, extras)
    folder = root / key
    started = time.monotonic()
    with open(root / f"{key}.lock", "a+") as in_use:
        # Shared, and held until the run ends: other runs may use it too, pruning may not remove it.
        fcntl.flock(in_use, fcntl.LOCK_SH)
        built = not is_complete(folder) and build_once(checkout, folder, digest, extras, on_line)
        (folder / LAST_USED).touch()
        env = RunEnvironment(folder, digest, built, time.monotonic() - started)
        if built:
            prune(root, keep_count(), on_line)
        yield env


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def build_once(
    checkout: Path, folder: Path, digest: str, extras: tuple[str, ...], on_line: Callable[[str], None]
) -> bool:
    """Build the environment unless a run that held the build lock first built it; True if built here."""
    with open(folder.with_name(f"{folder.name}.build"), "a+") as building:
        fcntl.flock(building, fcntl.LOCK_EX)  # waits for another run's build of it, if any: minutes at most
        if is_complete(folder):
            return False
        build(checkout, folder, digest, extras, on_line)
        return True


def build(checkout: Path, folder: Path, digest: str, extras: tuple[str, ...], on_line: Callable[[str], None]) -> None:
    """`uv sync --frozen` of the clone's lock into `folder`; one-line error naming the package."""
    shutil.rmtree(folder, ignore_errors=True)  # what a killed build left
    # No --compile-bytecode: the runs compile what they import, on first import (module docstring).
    command = [uv_binary(), "sync", "--frozen", "--no-install-project"]
    command += ["--python", sys.executable]
    command += [flag for extra in extras for flag in ("--extra", extra)]
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(folder),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
    }
    env.pop("VIRTUAL_ENV", None)  # the worker's own venv is not the target
    env.pop("UV_COMPILE_BYTECODE", None)  # set by the Makefile for .venv (a worker started by `make`)
    env.pop("COLUMNS", None)  # uv wraps its causes to COLUMNS; the one-line error reads the last line
    proc = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines()[-20:]:
        on_line(line)
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RunEnvironmentError(
            f"uv.lock {digest[:SHORT]} cannot be installed: {failing_package(proc.stderr)} ({last_reason(proc.stderr)})"
        )
    linked = link_bytecode(folder, Path(sys.prefix))
    if linked:
        on_line(f"{linked} compiled modules linked from the worker's own environment ({sys.prefix})")
    write_stamp(folder, digest)
    (folder / COMPLETE).write_text(digest + "\n", encoding="utf-8")


def site_packages(environment: Path) -> Path:
    return environment / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def link_bytecode(target: Path, donor: Path) -> int:
    """Hard-link `donor`'s `.pyc` files into the environment `target` wherever both hold the same
    source file (one inode: uv linked both from its cache); the number linked.

    Python accepts a `.pyc` whose recorded size and mtime are its source's, which a link of the
    same file has; a package of another version, or one copied rather than linked, is left to
    compile on first import. When Python rewrites a stale `.pyc` it replaces the file (a new
    inode), so the donor's own copy is never changed. A donor that is no virtual environment (a
    system Python) is not searched: its packages were never uv's.
    """
    if not (donor / "pyvenv.cfg").is_file():
        return 0
    donor_site, target_site = site_packages(donor), site_packages(target)
    suffix = f".{sys.implementation.cache_tag}.pyc"
    linked = 0
    for folder, dirs, _ in os.walk(donor_site):
        if "__pycache__" not in dirs:
            continue
        dirs.remove("__pycache__")
        relative = Path(folder).relative_to(donor_site)
        for pyc in os.scandir(Path(folder) / "__pycache__"):
            if not pyc.name.endswith(suffix):
                continue
            source = pyc.name[: -len(suffix)] + ".py"
            if not same_file(Path(folder) / source, target_site / relative / source):
                continue
            cache = target_site / relative / "__pycache__"
            cache.mkdir(exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.link(pyc.path, cache / pyc.name)
                linked += 1
    return linked


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def uv_binary() -> str:
    """The uv installed with the worker (a project dependency), else one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise RunEnvironmentError("uv is not installed on this worker: `make install` there") from None
        return found


# uv names the distribution it failed on in lines such as
#   "Failed to download `name==1.0`", "Failed to build `name @ file:///...`",
#   "Distribution not found at: file:///.../name-1.0-py3-none-any.whl"
PACKAGE_PATTERNS = (
    re.compile(r"`([A-Za-z0-9][A-Za-z0-9._-]*)(?:==[^`]*| @ [^`]*)?`"),
    re.compile(r"/([A-Za-z0-9][A-Za-z0-9._]*)-[0-9][^/\s]*\.(?:whl|tar\.gz|zip)\b"),
)


def failing_package(stderr: str) -> str:
    for pattern in PACKAGE_PATTERNS:
        match = pattern.search(stderr)
        if match:
            return f"package {match.group(1)}"
    return "a package"


def last_reason(stderr: str) -> str:
    """uv's innermost cause, on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else "uv gave no reason"
    return re.sub(r"^(error|Caused by|cause):\s*", "", reason)


def prune(root: Path, keep: int, on_line: Callable[[str], None]) -> list[str]:
    """Remove all but the `keep` most recently used environments, never one a run holds."""
    removed = []
    for folder in beyond_kept(root, keep):
        with unheld(root, folder) as free:
            if free:  # else a run is using it (or building it)
                remove(folder)
                removed.append(folder.name)
    if removed:
        on_line(f"removed {len(removed)} old environment(s), keeping the {keep} most recently used")
    return removed


def beyond_kept(root: Path, keep: int) -> list[Path]:
    """The environments pruning removes unless a run holds them: all but the `keep` most recently used."""
    folders = sorted((path for path in root.iterdir() if path.is_dir()), key=last_used, reverse=True)
    return folders[keep:]


@contextlib.contextmanager
def unheld(root: Path, folder: Path) -> Iterator[bool]:
    """True, holding its `<key>.lock` exclusively for the block, when no run holds the environment now."""
    with open(root / f"{folder.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def held(root: Path, folder: Path) -> bool:
    """Whether a run holds the environment now (tried without waiting; a look, nothing kept)."""
    with unheld(root, folder) as free:
        return not free


def remove(folder: Path) -> None:
    """Unmark the environment, then delete it: a removal killed half-way leaves one the next run rebuilds."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def last_used(folder: Path) -> float:
    try:
        return (folder / LAST_USED).stat().st_mtime
    except OSError:
        return 0.0
