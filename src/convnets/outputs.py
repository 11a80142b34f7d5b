"""Write stage outputs so that a failed run never leaves a half-written one behind; hash files one way.

A stage builds its outputs in a temporary sibling folder and only renames it
into place once everything succeeded. A crash leaves the previous output (or
nothing) where a later stage looks, never a truncated file. With `sync`, what
is renamed is on the disk before the rename and the rename after it, so a
power cut cannot leave a committed but empty file (convnets.resume's states).

The one rule for hashing a file (file_digest) lives here too: every stage
already imports this module, and it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path, sync: bool = False) -> Path:
    """Swap `src` into `final` with renames, so readers see the old or the new folder."""
    if sync:
        for path in [*src.rglob("*"), src]:
            fsync_path(path)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(src, final)
    if sync:
        fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_file(path: str | Path, sync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `path` when the block succeeds.

    The temporary name keeps the suffix (`.x.partial.npy`), so writers that add
    one when it is missing (numpy.save) write where they are told.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # Windows cannot open a folder: its renames are not synced this way
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, sync: bool = False) -> None:
    """Write a text file atomically (temp file + rename)."""
    with atomic_file(path, sync) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: object, sync: bool = False) -> None:
    """Write JSON atomically, keys sorted, so equal data give equal bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", sync)


def file_digest(path: str | Path, digest: str | Callable[[], Any] = "sha256") -> Any:
    """hashlib.file_digest of the file at `path`: a new hash by name, or a running one to feed on
    (`lambda: running`, as for several files in one digest). Read in chunks, never whole."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, digest)
