"""fetch -> split -> preprocess on a generated archive holding every kind of bad file."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convnets.errors import DataError
from convnets.fetch import fetch
from convnets.params import FetchParams, PreprocessParams, SplitParams
from convnets.preprocess import preprocess, read_manifest
from convnets.split import read_catalog, split

SIZE = [40, 48]  # height, width: not square, so a swapped axis shows
RANGES = SplitParams(method="index_ranges", train_range=[0, 10], val_range=[10, 14], test_range=[14, 20])


def photo(seed: int, width: int = 64, height: int = 56) -> Image.Image:
    """A smooth random RGB picture (JPEG keeps smooth pictures close to the original)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


# What each odd file is, and what preprocess must make of it.
SET_ASIDE_BY_PREPROCESS = {
    "cat.3.jpg": ("train", "empty_file"),
    "cat.5.jpg": ("train", "truncated"),
    "dog.4.jpg": ("train", "not_an_image"),
    "cat.11.jpg": ("val", "too_many_pixels"),  # claims 100,000 x 100,000 pixels
    "dog.12.jpg": ("val", "too_many_pixels"),  # a real 1,100 x 1,000 photo, above max_pixels
    "cat.15.jpg": ("test", "truncated"),  # cut inside the JPEG header
}
KEPT_WITH_CONVERSION = {
    "cat.7.jpg": "PNG_named_jpg",
    "dog.14.jpg": "BMP_named_jpg",
    "dog.8.jpg": "converted_from_L",
    "dog.9.jpg": "converted_from_CMYK",
}
MAX_PIXELS = 1_000_000


def train_zip_members(tmp_path) -> dict[str, bytes]:
    members = {}
    for label_id, label in enumerate(("cat", "dog")):
        for i in range(20):
            size = (64 + i, 56) if i % 2 else (30, 90)  # landscape and portrait
            members[f"train/{label}.{i}.jpg"] = encoded(photo(100 * label_id + i, *size), "JPEG", quality=95)
    good = members["train/cat.5.jpg"]
    members.update(
        {
            "train/cat.3.jpg": b"",
            "train/cat.5.jpg": good[: len(good) // 2],
            "train/cat.15.jpg": good[:300],
            "train/dog.4.jpg": b"<html><body>404 Not Found</body></html>",
            "train/cat.7.jpg": encoded(photo(7), "PNG"),
            "train/dog.14.jpg": encoded(photo(14), "BMP"),
            "train/dog.8.jpg": encoded(photo(8).convert("L"), "JPEG", quality=95),
            "train/dog.9.jpg": encoded(photo(9).convert("CMYK"), "JPEG", quality=95),
            "train/cat.11.jpg": png_header_only(100_000, 100_000),
            "train/dog.12.jpg": encoded(photo(12, 1100, 1000), "JPEG"),
            # Entries fetch refuses before anything is written:
            "train/Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1 thumbnails",
            "train/desktop.ini": b"[.ShellClassInfo]",
            "train/../../escape.jpg": good,
            f"{tmp_path}/abs/dog.30.jpg": good,
        }
    )
    return members


@pytest.fixture
def messy_archive(tmp_path):
    """dogs-vs-cats.zip holding a train.zip full of trouble, plus the project folder to fetch into."""
    members = train_zip_members(tmp_path)
    train = io.BytesIO()
    with zipfile.ZipFile(train, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    source = tmp_path / "downloads-elsewhere" / "dogs-vs-cats.zip"
    source.parent.mkdir()
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("train.zip", train.getvalue())
    project = tmp_path / "project"
    project.mkdir()
    return source, project, members


def run_stages(source, project, workers=None, **preprocess_changes) -> dict:
    data = project / "data"
    fetch(FetchParams(source="archive", archive=str(source), classes=["cat", "dog"]), data / "raw")
    manifest = split(read_catalog(data / "raw"), RANGES, seed=0)
    manifest.to_csv(project / "manifest.csv", index=False)
    params = PreprocessParams(image_size=SIZE, channels=3, max_pixels=MAX_PIXELS, max_bad_fraction=0.25)
    changed = params.model_copy(update=preprocess_changes)
    return preprocess(manifest, data / "raw", changed, data / "prepared", workers=workers)


def test_bad_files_are_set_aside_with_their_reason(messy_archive, tmp_path, monkeypatch):
    source, project, members = messy_archive
    monkeypatch.chdir(project)
    report = run_stages(source, project)
    prepared = project / "data" / "prepared"

    # What was set aside, and why.
    rejected = pd.read_csv(prepared / "rejected.csv", keep_default_na=False)
    by_preprocess = rejected[rejected["stage"] == "preprocess"]
    assert {
        row.file.rsplit("/", 1)[1]: (row.split, row.reason) for row in by_preprocess.itertuples()
    } == SET_ASIDE_BY_PREPROCESS
    by_fetch = rejected[rejected["stage"] == "fetch"]
    assert dict(zip(by_fetch["file"], by_fetch["reason"])) == {
        "train/Thumbs.db": "not_an_image_file",
        "train/desktop.ini": "not_an_image_file",
        "train/../../escape.jpg": "unsafe_path",
        f"{tmp_path}/abs/dog.30.jpg": "unsafe_path",
    }
    assert rejected["detail"].str.len().gt(0).all()
    assert (
        "above preprocess.max_pixels (1,000,000)"
        in by_preprocess.set_index("reason").loc["too_many_pixels", "detail"].iloc[1]
    )

    # The report DVC tracks counts the same.
    assert report == json.loads((prepared / "report.json").read_text())
    assert report["kept"] == {"train": 17, "val": 6, "test": 11}
    assert report["rejected"] == 10
    assert report["rejected_by_reason"] == {
        "empty_file": 1,
        "not_an_image": 1,
        "not_an_image_file": 2,
        "too_many_pixels": 2,
        "truncated": 2,
        "unsafe_path": 2,
    }
    assert report["rejected_by_class"] == {"cat": 4, "dog": 2}
    assert report["converted"] == {
        "BMP_named_jpg": 1,
        "PNG_named_jpg": 1,
        "converted_from_CMYK": 1,
        "converted_from_L": 1,
    }

    # What was kept: every good photo, in manifest order, resized, with its label.
    assert json.loads((prepared / "classes.json").read_text()) == ["cat", "dog"]
    manifest = pd.read_csv(project / "manifest.csv")
    bad = {name for name in SET_ASIDE_BY_PREPROCESS}
    for subset in ("train", "val", "test"):
        images = np.load(prepared / f"{subset}_images.npy")
        labels = np.load(prepared / f"{subset}_labels.npy")
        files = [f for f in manifest[manifest["split"] == subset]["file"] if f.rsplit("/", 1)[1] not in bad]
        assert images.shape == (len(files), *SIZE, 3) and images.dtype == np.uint8
        assert [("cat", "dog")[i] for i in labels] == [f.split("/")[1] for f in files]
        for image, file in zip(images, files):
            name = file.rsplit("/", 1)[1]
            expected = np.asarray(photo_as_decoded(members[f"train/{name}"]))
            if name == "dog.9.jpg":  # CMYK: colours survive, give or take JPEG and the conversion
                assert np.abs(image.astype(int) - expected).mean() < 8
            else:
                assert np.array_equal(image, expected), name
    gray = np.load(prepared / "train_images.npy")[
        [f.rsplit("/", 1)[1] for f in files_of(manifest, "train", bad)].index("dog.8.jpg")
    ]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])

    # Nothing was written outside the project's data folder.
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    outside = [p for p in written if not p.startswith(("project/data/", "downloads-elsewhere/"))]
    assert outside == ["project/manifest.csv"]  # the test's own file
    assert not (tmp_path / "abs").exists() and not any("escape" in p for p in written)


def files_of(manifest, subset, bad):
    return [f for f in manifest[manifest["split"] == subset]["file"] if f.rsplit("/", 1)[1] not in bad]


def photo_as_decoded(data: bytes) -> Image.Image:
    """The reference decoding: Pillow, RGB, bilinear resize to SIZE."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("workers", [1, 2])
def test_too_many_bad_files_in_a_class_stop_the_stage(messy_archive, workers):
    source, project, _ = messy_archive
    prepared = project / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "report.json").write_text('{"previous": "run"}')
    with pytest.raises(DataError) as info:
        run_stages(source, project, workers=workers, max_bad_fraction=0.15)  # cat: 4 of 20 bad = 20 %
    message = str(info.value)
    assert message.startswith("4 of the 20 'cat' images are bad already, more than preprocess.max_bad_fraction (0.15)")
    assert "empty_file 1" in message and "raise preprocess.max_bad_fraction" in message and "\n" not in message
    # The previous output is untouched and no half-written folder is left behind.
    assert (prepared / "report.json").read_text() == '{"previous": "run"}'
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared", "raw"]


def test_one_worker_and_several_write_the_same_bytes(messy_archive):
    """Decoding in worker processes changes nothing in the outputs, bad files included."""
    source, project, _ = messy_archive
    run_stages(source, project, workers=1)
    manifest = pd.read_csv(project / "manifest.csv", dtype=str, keep_default_na=False)
    params = PreprocessParams(image_size=SIZE, channels=3, max_pixels=MAX_PIXELS, max_bad_fraction=0.25)
    # 3 workers on 10 / 4 / 6 files: chunks of 1 or 2 files, several in flight, finishing out of order.
    preprocess(manifest, project / "data" / "raw", params, project / "parallel", workers=3)

    def contents(folder):
        return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}

    one, several = contents(project / "data" / "prepared"), contents(project / "parallel")
    assert {"train_images.npy", "test_labels.npy", "rejected.csv", "report.json", "classes.json"} <= set(one)
    assert b"truncated" in one["rejected.csv"] and b"not_an_image" in one["rejected.csv"]
    assert sorted(one) == sorted(several)
    assert [name for name in one if one[name] != several[name]] == []


def test_worker_count_is_every_usable_core_unless_the_variable_says(monkeypatch):
    import os

    from convnets.preprocess import WORKERS_VARIABLE, worker_count

    monkeypatch.delenv(WORKERS_VARIABLE, raising=False)
    assert worker_count() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(WORKERS_VARIABLE, "3")
    assert worker_count() == 3
    for wrong in ("0", "-1", "two"):
        monkeypatch.setenv(WORKERS_VARIABLE, wrong)
        with pytest.raises(DataError, match=f"CONVNETS_PREPROCESS_WORKERS={wrong!r}"):
            worker_count()


def test_a_class_exactly_at_the_limit_passes(messy_archive):
    source, project, _ = messy_archive
    report = run_stages(source, project, max_bad_fraction=0.2)  # cat: 4 of 20 is not more than 20 %
    assert report["rejected_by_class"]["cat"] == 4


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    """A decompression bomb is refused from its header: the decoder never runs."""
    from convnets.images import BadImage, load_image

    bomb = tmp_path / "cat.0.jpg"
    bomb.write_bytes(png_header_only(10_000, 8_000))  # 80 megapixels, 240 MB as RGB
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(BadImage) as info:
        load_image(bomb, (180, 180), 3, max_pixels=50_000_000)
    assert info.value.reason == "too_many_pixels"
    assert "10000 x 8000 = 80,000,000 pixels, above preprocess.max_pixels (50,000,000)" in str(info.value)
    # Far beyond, Pillow itself refuses while reading the header.
    bomb.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(BadImage) as info:
        load_image(bomb, (180, 180), 3, max_pixels=50_000_000)
    assert info.value.reason == "too_many_pixels" and "Pillow's own decompression-bomb limit" in str(info.value)


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path):
    """draft mode: a 2,000 px photo is decoded at 1/8 scale, not at full size, for a 180 px target."""
    from convnets.images import load_image

    path = tmp_path / "dog.1.jpg"
    path.write_bytes(encoded(photo(1, 2000, 1600), "JPEG"))
    opened = []
    original_load = Image.Image.load

    def spy(self):
        opened.append(self.size)
        return original_load(self)

    import unittest.mock

    with unittest.mock.patch.object(Image.Image, "load", spy):
        loaded = load_image(path, (180, 180), 3, max_pixels=50_000_000)
    assert loaded.array.shape == (180, 180, 3)
    assert opened[0] == (250, 200)


def test_preprocess_stage_command_line(messy_archive, capsys):
    """The stage prints where the set-aside files are listed, and exits 0."""
    import yaml

    from conftest import default_params
    from convnets.preprocess import main

    source, project, _ = messy_archive
    run_stages(source, project)  # fetch and split
    split_dir = project / "data" / "split"
    split_dir.mkdir()
    (project / "manifest.csv").rename(split_dir / "manifest.csv")
    params = default_params()
    params["preprocess"] = {"image_size": SIZE, "channels": 3, "max_pixels": MAX_PIXELS, "max_bad_fraction": 0.25}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    data = project / "data"
    code = main([str(data / "raw"), str(split_dir), str(data / "prepared"), "--params", str(project / "params.yaml")])
    assert code == 0
    out = capsys.readouterr().out
    assert "set aside 10 (" in out and "too_many_pixels 2" in out and "see rejected.csv" in out
    assert len(read_manifest(split_dir)) == 40


@pytest.mark.parametrize("header_grows", [False, True])
def test_npy_rows_writes_what_np_load_reads(tmp_path, monkeypatch, header_grows):
    """Rows land in any order, bad ones are dropped; the header is corrected in place or (rarely) by a copy."""
    import convnets.preprocess as prep

    if header_grows:  # make the capacity's header longer than the final one, as a numpy change could
        real = prep.npy_header

        def padded(shape):
            header = real(shape)
            if shape[0] != 10:
                return header
            body = header[10:].rstrip(b"\n") + b" " * 64 + b"\n"
            return header[:8] + struct.pack("<H", len(body)) + body

        monkeypatch.setattr(prep, "npy_header", padded)
    rows = [np.full((2, 3, 3), i, dtype=np.uint8) for i in range(10)]
    with prep.NpyRows(tmp_path / "x.npy", (2, 3, 3), capacity=10) as out:
        for index in [9, 0, 4, 2, 5, 7]:  # any order, as the workers finish
            out.put(index, rows[index])
        for index in [1, 3, 6, 8]:  # bad files: their rows are dropped
            out.skip(index)
    loaded = np.load(tmp_path / "x.npy")
    kept = [0, 2, 4, 5, 7, 9]
    assert loaded.shape == (6, 2, 3, 3) and np.array_equal(loaded, np.stack([rows[i] for i in kept]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
