"""A worker's clones: made from one git mirror per machine and linked to one DVC cache
(pipeline.workspace, pipeline.experiment). The git tests use tiny repositories, the DVC one a
tiny DVC project.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import git, venv_env
from pipeline import experiment, workspace


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Path:
    """One worker machine: its work folder, git mirrors and DVC cache under tmp_path."""
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.GIT_MIRRORS_ENV, str(tmp_path / "mirrors"))
    monkeypatch.setenv(workspace.DVC_CACHE_ENV, str(tmp_path / "dvc-cache"))
    return tmp_path


def small_origin(tmp_path: Path) -> tuple[Path, Path, str]:
    """A bare `origin` with one commit, and the working repository that pushes to it."""
    work, origin = tmp_path / "work", tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    (work / "f").write_text("one\n")
    git(work, "add", "f")
    git(work, "commit", "-q", "-m", "one")
    git(work, "push", "-q", str(origin), "main")
    return work, origin, git(work, "rev-parse", "HEAD").strip()


def same_file(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_dev == os.stat(b).st_dev


# --- git: one mirror per machine ------------------------------------------------------------


def test_clones_come_from_the_machines_mirror_which_fetches_only_what_is_new(machine):
    work, origin, first = small_origin(machine)
    with workspace.clean_checkout(str(origin), first, "a") as clone:
        assert (clone / "f").read_text() == "one\n"
        # pushes go to the real remote, not to the mirror
        assert git(clone, "remote", "get-url", "origin").strip() == str(origin)
        (mirror,) = (machine / "mirrors").glob("*.git")
        objects = clone / ".git" / "objects"
        stored = [f for f in objects.rglob("*") if f.is_file() and f.parent.name != "info"]
        # git's object files are the mirror's, hard-linked, not copied
        assert stored and all(same_file(f, mirror / "objects" / f.relative_to(objects)) for f in stored)
    assert list((machine / "runs").iterdir()) == []

    # The mirror holds the commit: a second clone of it does not even ask the remote.
    origin.rename(machine / "away.git")
    with workspace.clean_checkout(str(origin), first, "b") as clone:
        assert git(clone, "rev-parse", "HEAD").strip() == first
    (machine / "away.git").rename(origin)

    # A new commit: the mirror fetches it (and only it), the clone has it.
    (work / "f").write_text("two\n")
    git(work, "commit", "-q", "-am", "two")
    git(work, "push", "-q", str(origin), "main")
    second = git(work, "rev-parse", "HEAD").strip()
    with workspace.clean_checkout(str(origin), second, "c") as clone:
        assert (clone / "f").read_text() == "two\n"
        assert git(clone, "rev-parse", "origin/main").strip() == second
    assert [m.name for m in (machine / "mirrors").glob("*.git")] == [mirror.name]  # still one mirror

    with pytest.raises(workspace.WorkspaceError, match="commit 0000000 is not on .*: push it"):
        with workspace.clean_checkout(str(origin), "0" * 40, "x"):
            pass


def test_runs_starting_together_take_turns_on_the_mirror(machine, monkeypatch):
    _, origin, commit = small_origin(machine)
    mirrors = str(machine / "mirrors")
    guard = threading.Lock()
    active, most, errors, heads = [0], [0], [], []
    real_git = workspace.git

    def watched_git(cwd, *args, check=True):
        """git, counting the commands that touch the mirror (init, config, fetch, clone) at once."""
        on_mirror = str(cwd).startswith(mirrors) or any(mirrors in arg for arg in args)
        if not on_mirror:
            return real_git(cwd, *args, check=check)
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # widens the window in which an unlocked run would overlap
            return real_git(cwd, *args, check=check)
        finally:
            with guard:
                active[0] -= 1

    def run(label):
        try:
            with workspace.clean_checkout(str(origin), commit, label) as clone:
                heads.append(git(clone, "rev-parse", "HEAD").strip())
        except Exception as exc:  # reported below
            errors.append(exc)

    monkeypatch.setattr(workspace, "git", watched_git)
    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and heads == [commit] * 6
    assert most[0] == 1  # never two runs on the mirror at once
    assert len(list((machine / "mirrors").glob("*.git"))) == 1


def test_the_mirror_lock_holds_against_other_processes(machine):
    """An flock on <mirror>.lock, held while a run fetches into or clones from the mirror."""
    _, origin, commit = small_origin(machine)
    script = (
        "import sys\n"
        "from pipeline import workspace\n"
        "with workspace.git_mirror(sys.argv[1], sys.argv[2]):\n"
        "    print('in', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(origin), commit],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "in"
        (lock,) = (machine / "mirrors").glob("*.lock")
        with lock.open("a") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.communicate("\n", timeout=30)
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the run is done
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0


# --- DVC: one cache per machine, linked into the clones -------------------------------------


def dvc(project: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=venv_env())
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def reflinks_here(folder: Path) -> bool:
    """Copy-on-write copies (btrfs, XFS): DVC uses them first, and they share blocks, not inodes."""
    source = folder / "reflink-probe"
    source.write_bytes(b"x" * 4096)
    done = subprocess.run(["cp", "--reflink=always", str(source), str(folder / "reflink-copy")], capture_output=True)
    return done.returncode == 0


def unique_bytes(*folders: Path) -> tuple[int, int]:
    """(bytes counting each file once per inode, bytes counting every path): du's view and a naive sum."""
    seen: set[tuple[int, int]] = set()
    unique = naive = 0
    for folder in folders:
        for path in folder.rglob("*"):
            info = path.lstat()
            if not path.is_file() or path.is_symlink():
                continue
            naive += info.st_size
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                unique += info.st_size
    return unique, naive


@pytest.mark.slow
def test_two_clones_on_one_machine_share_one_copy_of_the_data(machine):
    if reflinks_here(machine):
        pytest.skip("this file system makes copy-on-write copies: shared blocks, not shared inodes")
    project, origin, remote = machine / "project", machine / "origin.git", machine / "dvc-remote"
    subprocess.run(["git", "init", "-q", "-b", "main", str(project)], check=True)
    dvc(project, "init", "-q")
    dvc(project, "remote", "add", "-d", "storage", str(remote))
    script = "import os; os.makedirs('out'); [open(f'out/{i}.bin', 'wb').write(os.urandom(65536)) for i in range(40)]"
    dvc(project, "stage", "add", "-n", "make", "-o", "out", f'python -c "{script}"')
    dvc(project, "repro", "-q")
    dvc(project, "push", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "data")
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(project, "push", "-q", str(origin), "main")
    commit = git(project, "rev-parse", "HEAD").strip()
    data = 40 * 65536

    with (
        workspace.clean_checkout(str(origin), commit, "one") as one,
        workspace.clean_checkout(str(origin), commit, "two") as two,
    ):
        pulls = []
        for clone in (one, two):
            experiment.configure_dvc(clone, str(remote))
            pulls.append(threading.Thread(target=dvc, args=(clone, "pull", "-q")))
        for pull in pulls:
            pull.start()
        for pull in pulls:
            pull.join()
        for clone in (one, two):
            assert len(list((clone / "out").iterdir())) == 40
            assert (clone / ".dvc" / "tmp" / "site-cache").is_dir()  # DVC's state goes with the clone
        unique, naive = unique_bytes(machine / "dvc-cache", one / "out", two / "out")
        assert naive >= 3 * data  # the cache and two workspaces, each counted on its own
        assert data <= unique < 1.1 * data  # but one copy on disk
        (sample,) = [p for p in (one / "out").iterdir() if p.name == "0.bin"]
        assert sample.stat().st_nlink >= 3 and same_file(sample, two / "out" / "0.bin")


# --- the real pipeline: a point whose first stage to run is train -------------------------------
