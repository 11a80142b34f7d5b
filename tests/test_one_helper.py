"""One helper for each small job: file hashes, atomic writes, the resume folder's name, which
environments go. The digests are persisted (download notes, resume keys, environment keys), so
they are pinned against the bytes hashed whole, as before the helper."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time

import pytest

import convnets.resume
from convnets import environment, outputs
from convnets.downloads import sha256_of
from convnets.layout import resume_states_dir
from pipeline import clean, environments

# Larger than every chunk the hand-written loops read (1 MiB downloads, 4 MiB resume) and hashlib's.
LARGE = bytes(range(256)) * ((1 << 22) // 256 + 1000) + b"tail"
CONTENTS = {"empty": b"", "small": b"convnets\n", "large": LARGE}
# digest_files of CONTENTS, computed by the chunked loop it had before outputs.file_digest.
PINNED_FILES_DIGEST = "c3b932a4f2e5d4fb4f746d0a20505b7e"


@pytest.fixture
def files(tmp_path):
    for name, data in CONTENTS.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in CONTENTS}


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_sha256_digests_are_those_of_the_whole_bytes(files, name):
    expected = hashlib.sha256(CONTENTS[name]).hexdigest()
    assert sha256_of(files[name]) == expected  # the download notes
    assert environment.lock_digest(files[name]) == expected  # the environment stamps and keys


def test_digest_files_is_that_of_names_and_whole_bytes(files):
    reference = hashlib.blake2b(digest_size=16)
    for name in sorted(CONTENTS):
        reference.update(name.encode() + b"\0" + CONTENTS[name])
    assert convnets.resume.digest_files(files) == reference.hexdigest() == PINNED_FILES_DIGEST


def test_atomic_file_removes_its_temporary_file_on_error(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), outputs.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and path.read_text() == "old"


def record_syncs(monkeypatch) -> list[tuple]:
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files through /proc")
def test_synced_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    events = record_syncs(monkeypatch)
    outputs.write_json(tmp_path / "key.json", {"a": 1}, sync=True)
    tmp = str(tmp_path / ".key.partial.json")
    assert events == [("fsync", tmp), ("replace", tmp, str(tmp_path / "key.json")), ("fsync", str(tmp_path))]

    events.clear()
    folder = tmp_path / ".epoch.partial"
    folder.mkdir()
    (folder / "state").write_text("state")
    outputs.replace_dir(folder, tmp_path / "epoch", sync=True)
    synced = {("fsync", str(folder / "state")), ("fsync", str(folder))}
    assert set(events[:2]) == synced and events[2:] == [
        ("replace", str(folder), str(tmp_path / "epoch")),
        ("fsync", str(tmp_path)),
    ]


def test_the_resume_folder_is_named_once_without_keras():
    assert convnets.resume.default_resume_root("run").parent == resume_states_dir()
    script = "import sys, pipeline.clean; sys.exit(any(m in sys.modules for m in ('keras', 'tensorflow')))"
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0


def make_environment(root, name: str, used: float):
    folder = root / name
    folder.mkdir()
    (folder / environments.COMPLETE).write_text(name + "\n")
    (folder / environments.LAST_USED).touch()
    os.utime(folder / environments.LAST_USED, (used, used))
    return folder


def test_clean_plans_what_prune_removes(tmp_path):
    now = time.time()
    newest, held, old = (make_environment(tmp_path, name, now - age) for name, age in [("a", 0), ("b", 60), ("c", 120)])
    assert environments.beyond_kept(tmp_path, 1) == [held, old]
    with open(tmp_path / "b.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # a run uses b
        planned = [removal.path for removal in clean.environments_beyond_kept(tmp_path, 1)]
        assert planned == [str(old)]
        assert environments.prune(tmp_path, 1, lambda line: None) == [old.name]
    assert newest.is_dir() and held.is_dir() and not old.exists()
