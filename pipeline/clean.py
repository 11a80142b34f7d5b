"""What grows on a worker's disk and may go: `python -m pipeline clean [--dry-run]`.

A worker's disk holds, besides its own checkout and venv:

- the work folder (pipeline.workspace.work_root): one clone per run, removed when the run
  ends, except a run whose worker died (kill -9, a lost machine, a preemption) and a run
  whose push failed (KeepCheckout: its experiment exists only there);
- resume states (convnets.resume) in the user cache, removed by the run that finishes them,
  left by a run that failed, was cancelled, or stopped early (train.stop_at_epoch); and their
  copies on the mirror beside the DVC remote, which every worker reaches;
- run environments (pipeline.environments), pruned to the kept ones after each build;
- the git mirrors and the machine's DVC cache, left alone here (docs/orchestration.md, "What
  grows on a worker and how it is bounded", says why).

A clone belongs to a live run while a process on this machine works in it (its cwd or an
open file is inside: `dvc exp run`, git, uv), while its run holds a lock on the folder, or
while it changed less than CLONE_GRACE_S ago (a run between two commands, or one that has
just made its folder). A dead run's clone goes after that grace, unless it holds an
experiment (refs/exps): that is a result which may exist nowhere else, kept for the age
given to states. Everything here is read from the disk as it is; nothing is recorded.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from convnets.layout import RESUME_URL_ENV, resume_states_dir
from pipeline import environments, workspace

DAY_S = 24 * 3600
DEFAULT_OLDER_THAN_DAYS = 7.0
# Long against any gap between a live run's commands (seconds), short against a dead run's disk.
CLONE_GRACE_S = 3600
PROC = Path("/proc")
# clean_checkout's folders: tempfile.mkdtemp(prefix=f"{safe_name(label)}-"), 8 random characters after
RUN_FOLDER = re.compile(r"^[A-Za-z0-9._-]+-[a-z0-9_]{8}$")

InUse = Callable[[Path], bool]


@dataclass(frozen=True)
class Removal:
    kind: str  # clone, resume state, mirrored resume state, environment
    path: str
    freed: int  # bytes that removing it gives back (files hard-linked elsewhere stay)
    why: str


# --- what a live run holds ------------------------------------------------------------------


def paths_open_here(proc: Path = PROC) -> set[str]:
    """The working folders and open files of the processes this user may look into (Linux's /proc;
    empty elsewhere, where the lock and the grace alone tell a live run)."""
    paths: set[str] = set()
    for pid in proc.iterdir() if proc.is_dir() else ():
        if not pid.name.isdigit():
            continue
        links = [pid / "cwd"]
        try:
            links += list((pid / "fd").iterdir())
        except OSError:  # another user's process, or one that just ended
            pass
        for link in links:
            try:
                paths.add(os.readlink(link))
            except OSError:
                continue
    return paths


def inside(paths: Iterable[str], folder: Path) -> bool:
    real = os.path.realpath(folder)
    return any(path == real or path.startswith(real + os.sep) for path in paths)


def run_folder_locked(folder: Path) -> bool:
    """A run holds a flock on its folder (a shared one, released when its process dies)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)  # also lets go of the lock just taken
    return False


def in_use_on_this_machine() -> InUse:
    """A snapshot of what the processes on this machine hold, as a test for one folder."""
    opened = paths_open_here()
    return lambda folder: run_folder_locked(folder) or inside(opened, folder)


# --- what each folder costs and when it last changed ----------------------------------------


def entries(folder: Path) -> Iterable[os.stat_result]:
    """lstat of `folder` and of everything in it, never following a link."""
    yield os.lstat(folder)
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                yield os.lstat(os.path.join(parent, name))
            except OSError:  # removed while we looked
                continue


def last_change(folder: Path) -> float:
    return max(entry.st_mtime for entry in entries(folder))


def freed_bytes(folder: Path) -> int:
    """The bytes removing `folder` frees: a file also linked from outside it (DVC's cache,
    uv's cache) stays on disk."""
    links_inside: dict[tuple[int, int], int] = {}
    files: dict[tuple[int, int], os.stat_result] = {}
    for entry in entries(folder):
        if entry.st_nlink and not stat.S_ISDIR(entry.st_mode):
            inode = (entry.st_dev, entry.st_ino)
            links_inside[inode] = links_inside.get(inode, 0) + 1
            files[inode] = entry
    return sum(entry.st_size for inode, entry in files.items() if links_inside[inode] >= entry.st_nlink)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds < 2 * DAY_S else f"{seconds / DAY_S:.1f} days"


# --- clones ---------------------------------------------------------------------------------


def holds_experiment(clone: Path) -> bool:
    """The clone has DVC experiment refs (a run that ended or died before its push went home)."""
    git_dir = clone / ".git"
    if not git_dir.is_dir():
        return False
    proc = subprocess.run(
        ["git", f"--git-dir={git_dir}", "for-each-ref", "--count=1", "refs/exps/"], capture_output=True, text=True
    )
    return bool(proc.stdout.strip())


def dead_clones(root: Path, now: float, older_than_s: float, in_use: InUse) -> list[Removal]:
    removals = []
    for clone in sorted(path for path in root.iterdir() if path.is_dir() and not path.is_symlink()):
        if not RUN_FOLDER.match(clone.name) or in_use(clone):  # what someone else put there stays
            continue
        idle = now - last_change(clone)
        experiment = holds_experiment(clone)
        if idle < (older_than_s if experiment else CLONE_GRACE_S):
            continue
        what = "an experiment that never went home" if experiment else "a dead run's clone"
        removals.append(Removal("clone", str(clone), freed_bytes(clone), f"{what}, untouched for {hours(idle)}"))
    return removals


# --- resume states --------------------------------------------------------------------------


def default_resume_url() -> str | None:
    """The mirror this worker's runs use when it is set where the worker starts (else the flows set
    one per run, beside its DVC remote: pass that as --resume-url)."""
    return os.environ.get(RESUME_URL_ENV) or None


def old_resume_states(root: Path, now: float, older_than_s: float, in_use: InUse) -> list[Removal]:
    """The states no run wrote for `older_than_s`: a rerun of theirs would start over (cost, not loss)."""
    if not root.is_dir():
        return []
    removals = []
    for state in sorted(path for path in root.iterdir() if path.is_dir()):
        idle = now - last_change(state)
        if idle >= older_than_s and not in_use(state):
            removals.append(Removal("resume state", str(state), freed_bytes(state), f"untouched for {hours(idle)}"))
    return removals


def old_mirrored_states(url: str, now: float, older_than_s: float) -> list[Removal]:
    """The same on the mirror (any fsspec URL, `<url>/<state>/LATEST` and its epoch folders)."""
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(url.rstrip("/"))
    if not fs.isdir(base):
        return []
    removals = []
    for state in sorted(fs.ls(base, detail=False)):
        changed = mirrored_change(fs, state)
        if changed is None or now - changed < older_than_s:  # an unknown age is no age
            continue
        where = fs.unstrip_protocol(state)
        removals.append(
            Removal("mirrored resume state", where, int(fs.du(state)), f"untouched for {hours(now - changed)}")
        )
    return removals


def mirrored_change(fs, state: str) -> float | None:
    """When anything in a mirrored state last changed (LATEST is rewritten every epoch)."""
    times = []
    for path in [state, *(fs.ls(state, detail=False) if fs.isdir(state) else [])]:
        try:
            times.append(fs.modified(path).timestamp())
        except (NotImplementedError, OSError, ValueError, TypeError, AttributeError):
            continue  # an object store's folder has no time; its files do
    return max(times, default=None)


# --- environments ---------------------------------------------------------------------------


def environments_beyond_kept(root: Path, keep: int) -> list[Removal]:
    """What environments.prune would remove now: its selection, less those a run holds."""
    why = f"beyond the {keep} most recently used, {environments.KEEP_ENV}"
    folders = [folder for folder in environments.beyond_kept(root, keep) if not environments.held(root, folder)]
    return [Removal("environment", str(folder), freed_bytes(folder), why) for folder in folders]


# --- the plan and carrying it out -----------------------------------------------------------


def plan(
    older_than_s: float = DEFAULT_OLDER_THAN_DAYS * DAY_S,
    resume_url: str | None = None,
    in_use: InUse | None = None,
    now: float | None = None,
) -> list[Removal]:
    """Everything this worker may remove now, nothing removed."""
    now = time.time() if now is None else now
    in_use = in_use or in_use_on_this_machine()
    removals = dead_clones(workspace.work_root(), now, older_than_s, in_use)
    removals += old_resume_states(resume_states_dir(), now, older_than_s, in_use)
    if resume_url:
        removals += old_mirrored_states(resume_url, now, older_than_s)
    return removals + environments_beyond_kept(environments.envs_root(), environments.keep_count())


def carry_out(removals: list[Removal], on_line: Callable[[str], None]) -> list[Removal]:
    """Remove what was planned, each clone and state checked again just before; the
    environments through environments.prune, the one rule for them (unmarked, then deleted)."""
    in_use = in_use_on_this_machine()
    done = [removal for removal in removals if removal.kind != "environment" and remove_one(removal, in_use, on_line)]
    if any(removal.kind == "environment" for removal in removals):
        pruned = set(environments.prune(environments.envs_root(), environments.keep_count(), on_line))
        done += [removal for removal in removals if removal.kind == "environment" and Path(removal.path).name in pruned]
    return done


def remove_one(removal: Removal, in_use: InUse, on_line: Callable[[str], None]) -> bool:
    if removal.kind == "mirrored resume state":
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(removal.path)
        fs.rm(path, recursive=True)
        return True
    folder = Path(removal.path)
    if in_use(folder):
        on_line(f"kept {folder}: in use now")
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def run(older_than_days: float, resume_url: str | None, dry_run: bool, on_line: Callable[[str], None] = print) -> int:
    """`python -m pipeline clean`: print what goes and how many bytes, then remove it (not with --dry-run)."""
    removals = plan(older_than_days * DAY_S, resume_url)
    verb = "would remove" if dry_run else "removing"
    for removal in removals:
        on_line(f"{verb} {removal.kind} {removal.path}: {size(removal.freed)} ({removal.why})")
    done = removals if dry_run else carry_out(removals, on_line)
    total = size(sum(removal.freed for removal in done))
    if dry_run:
        on_line(f"would free {total} in {len(done)} item(s) (--dry-run: nothing removed)")
    else:
        on_line(f"freed {total} in {len(done)} item(s)")
    on_line(f"left alone: the machine's DVC cache {workspace.machine_dvc_cache()} and git mirrors (see docs)")
    return 0
