"""Extract a labelled photo set (Kaggle's dogs-vs-cats layout) safely into the data folder.

Accepted sources, all holding files named <label>.<index>.<ext> (cat.1234.jpg):

- the competition archive: dogs-vs-cats.zip holding train.zip (read in place,
  never unpacked to disk), test1.zip and sampleSubmission.csv;
- a bare train.zip (train/cat.0.jpg ...), or any zip of such files;
- a folder: the extracted competition (holding train.zip) or the extracted
  train/ folder, or a folder of the images themselves.

When a `train` folder is present only it is read (test1/ holds unlabelled photos).

Safety: a file's destination is built from its parsed label and index only,
never from its path in the archive, so nothing can land outside the output
folder; members whose path has `..` or is absolute are refused and reported
all the same, as are links and special files. The bytes written are bounded
(`fetch.max_extract_bytes`), checked against the archive's directory before
anything is written and again while copying, since a damaged or malicious
archive can lie about its sizes.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pandas as pd

from convnets.errors import DataError
from convnets.images import EXTENSION_FORMATS
from convnets.layout import IMAGES_DIR, SET_ASIDE_COLUMNS
from convnets.progress import progress

LABELLED_NAME = re.compile(r"^(?P<label>[A-Za-z][A-Za-z0-9_-]*)\.(?P<index>\d{1,9})\.(?P<ext>[A-Za-z0-9]+)$")
# Files that operating systems drop into photo folders.
SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store"}
COPY_CHUNK = 1 << 20

# Reason codes for files set aside while fetching (docs/data.md explains each).
UNSAFE_PATH = "unsafe_path"
LINK = "link_or_special_file"
NOT_AN_IMAGE_FILE = "not_an_image_file"
UNLABELLED = "unlabelled_name"
UNKNOWN_CLASS = "unknown_class"
DUPLICATE = "duplicate_index"
DAMAGED = "damaged_in_archive"


@dataclass(frozen=True)
class Member:
    """One entry of a source: a zip member or a file in a folder."""

    name: str  # its path inside the source, as reported
    size: int  # bytes, as the source declares them
    is_file: bool  # False for links, devices, pipes
    open: Callable[[], contextlib.AbstractContextManager[BinaryIO]]


@dataclass(frozen=True)
class Labelled:
    member: Member
    label: str
    index: int
    filename: str  # <label>.<index>.<ext>, the destination's name


@dataclass
class Extracted:
    catalog: pd.DataFrame  # file,label,index of the images written
    set_aside: pd.DataFrame  # file,label,reason,detail of the entries refused
    layout: str  # what kind of source it was, for the log


class Budget:
    """Counts bytes written and stops at the limit."""

    def __init__(self, limit: int, source: str):
        self.limit, self.used, self.source = limit, 0, source

    def check_declared(self, total: int) -> None:
        if total > self.limit:
            raise DataError(self.message(f"would extract to {total:,} bytes"))

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise DataError(self.message(f"extracted more than its directory declared ({self.used:,} bytes so far)"))

    def message(self, what: str) -> str:
        return (
            f"{self.source} {what}, more than fetch.max_extract_bytes ({self.limit:,}): "
            "raise fetch.max_extract_bytes if this archive is really that large"
        )


def extract_labelled_images(source: Path, out_dir: Path, max_bytes: int, classes: list[str] | None = None) -> Extracted:
    """Copy the labelled images of `source` to out_dir/images/<label>/; report what was refused."""
    allowed = {name.lower() for name in classes or []}
    with open_members(source) as (layout, members):
        labelled, set_aside = sort_members(members, allowed)
        budget = Budget(max_bytes, str(source))
        budget.check_declared(sum(item.member.size for item in labelled))
        rows = []
        for item in progress(labelled, f"fetch: extracting {source.name}", total=len(labelled)):
            rel = PurePosixPath(IMAGES_DIR, item.label, item.filename)
            try:
                copy_member(item.member, out_dir / rel, budget)
            except Unreadable as exc:
                set_aside.append(refusal(item.member.name, DAMAGED, f"cannot read it: {exc}", item.label))
                continue
            rows.append((rel.as_posix(), item.label, item.index))
    catalog = pd.DataFrame(rows, columns=["file", "label", "index"])
    set_aside = pd.DataFrame(set_aside, columns=SET_ASIDE_COLUMNS)
    check_found_images(catalog, set_aside, allowed, source)
    return Extracted(catalog, set_aside, layout)


def check_found_images(catalog: pd.DataFrame, set_aside: pd.DataFrame, allowed: set[str], source: Path) -> None:
    if catalog.empty:
        by_reason = sorted(set_aside["reason"].value_counts().items(), key=lambda item: (-item[1], item[0]))
        refused = ", ".join(f"{n} {reason}" for reason, n in by_reason)
        raise DataError(
            f"no labelled images (<label>.<index>.jpg, such as cat.0.jpg) found in {source}"
            + (f" (set aside: {refused})" if refused else "")
            + ": is it the dogs-vs-cats archive, its train.zip or their extracted folder?"
        )
    missing = sorted(allowed - set(catalog["label"]))
    if missing:
        raise DataError(f"{source} holds no images of class {', '.join(missing)} (fetch.classes)")


# --- which entries are images, and of which class ------------------------------


def sort_members(members: list[Member], allowed: set[str]) -> tuple[list[Labelled], list[dict]]:
    """Split the entries into labelled images to extract and refusals with their reason."""
    labelled: list[Labelled] = []
    set_aside: list[dict] = []
    seen: dict[tuple[str, int], str] = {}
    only_train = any("train" in path_parts(m.name)[:-1] for m in members)
    for member in members:
        parts = path_parts(member.name)
        if is_unsafe(member.name):
            set_aside.append(refusal(member.name, UNSAFE_PATH, "absolute path or '..': never extracted"))
            continue
        if only_train and "train" not in parts[:-1]:
            continue  # test1/, sampleSubmission.csv: not part of the labelled set
        reason, detail, item = classify(member, parts[-1])
        if item is not None and allowed and item.label not in allowed:
            reason, detail = UNKNOWN_CLASS, f"class {item.label!r} is not in fetch.classes"
        elif item is not None and (item.label, item.index) in seen:
            reason, detail = DUPLICATE, f"same class and index as {seen[item.label, item.index]}"
        if reason:
            set_aside.append(refusal(member.name, reason, detail, item.label if item else ""))
            continue
        seen[item.label, item.index] = member.name
        labelled.append(item)
    return labelled, set_aside


def classify(member: Member, basename: str) -> tuple[str, str, Labelled | None]:
    """Return (reason, detail, None) for a refusal, ("", "", item) for an image to extract."""
    match = LABELLED_NAME.match(basename)
    item = None
    if match:
        label = match["label"].lower()
        item = Labelled(member, label, int(match["index"]), f"{label}.{int(match['index'])}.{match['ext'].lower()}")
    if not member.is_file:
        return LINK, "a link or special file, not a regular file", item
    lower = basename.lower()
    if lower in SYSTEM_FILES or lower.startswith("._") or "__MACOSX" in path_parts(member.name):
        return NOT_AN_IMAGE_FILE, "operating-system metadata file", None
    if PurePosixPath(lower).suffix not in EXTENSION_FORMATS:
        return NOT_AN_IMAGE_FILE, "its extension is not an image format's", item
    if item is None:
        return UNLABELLED, "name is not <label>.<index>.<ext>", None
    return "", "", item


def path_parts(name: str) -> list[str]:
    # Zips made on Windows may use backslashes.
    return [part for part in re.split(r"[\\/]", name) if part]


def is_unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None or ".." in path_parts(name)


def refusal(name: str, reason: str, detail: str, label: str = "") -> dict:
    return {"file": name, "label": label, "reason": reason, "detail": detail}


# --- reading the sources ---------------------------------------------------------------


@contextlib.contextmanager
def open_members(source: Path) -> Iterator[tuple[str, list[Member]]]:
    """Yield (layout description, entries) of a zip, a zip in a zip, or a folder."""
    if source.is_dir():
        if (source / "train.zip").is_file():
            with open_members(source / "train.zip") as (_, members):
                yield "extracted competition folder (train.zip inside)", members
        else:
            yield "folder", folder_members(source)
        return
    if not source.is_file():
        raise DataError(f"{source} not found (a relative fetch.archive is relative to the repo root)")
    try:
        with zipfile.ZipFile(source) as outer:
            inner = [info for info in outer.infolist() if path_parts(info.filename)[-1:] == ["train.zip"]]
            if inner and not is_unsafe(inner[0].filename):
                # The competition archive: read train.zip inside it in place, no copy on disk.
                with outer.open(inner[0]) as stream, zipfile.ZipFile(stream) as train:
                    yield "competition archive (train.zip inside)", zip_members(train)
            else:
                yield "zip archive", zip_members(outer)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{source} is not a readable zip archive ({exc}): download it again") from None


def zip_members(archive: zipfile.ZipFile) -> list[Member]:
    # In the order of the data in the file, so reading a zip inside a zip only seeks forward.
    infos = sorted((info for info in archive.infolist() if not info.is_dir()), key=lambda info: info.header_offset)
    return [
        Member(info.filename, info.file_size, is_regular_zip_file(info), lambda info=info: archive.open(info))
        for info in infos
    ]


def is_regular_zip_file(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits; zips made elsewhere leave the file type (or all of it) zero.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    return file_type in (0, stat.S_IFREG)


def folder_members(root: Path) -> list[Member]:
    base = root / "train" if (root / "train").is_dir() else root
    members = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        links = [name for name in dirnames if Path(dirpath, name).is_symlink()]
        for name in sorted(filenames) + links:
            path = Path(dirpath, name)
            info = path.lstat()
            members.append(
                Member(
                    path.relative_to(root).as_posix(),
                    info.st_size,
                    stat.S_ISREG(info.st_mode),
                    lambda path=path: open(path, "rb"),
                )
            )
    return members


class Unreadable(Exception):
    """The source's copy of a file is damaged; other files may still be fine."""


def copy_member(member: Member, target: Path, budget: Budget) -> None:
    """Copy one entry; Unreadable if the source fails, while a failing write (disk full) stops the stage."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with reading(member.open) as source, open(target, "wb") as out:
            while chunk := reading(lambda: source.read(COPY_CHUNK)):
                budget.take(len(chunk))
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)  # no half-written image for preprocess to trip on
        raise


def reading(action):
    try:
        return action()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # bad CRC, broken deflate stream, ...
        raise Unreadable(str(exc)) from None
