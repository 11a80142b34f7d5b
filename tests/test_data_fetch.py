"""fetch from Kaggle's dogs-vs-cats layouts (generated photos; the replica itself when ../shared has it),
from a URL, and its refusals."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.states import Failed

from conftest import SHARED_DIR
from convnets.errors import DataError, ParamsError
from convnets.fetch import fetch
from convnets.layout import SET_ASIDE, downloads_dir
from convnets.params import FetchParams

REPLICA = SHARED_DIR / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
needs_replica = pytest.mark.skipif(not REPLICA.is_file(), reason=f"the offline replica {REPLICA} is not there")
PER_CLASS = 30  # photos per class in the small layouts below


def archive_params(archive, **changes) -> FetchParams:
    return FetchParams(source="archive", archive=str(archive), classes=["cat", "dog"], retry_backoff_s=0.0, **changes)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """PER_CLASS cats and dogs named as in Kaggle's train.zip: small generated JPEGs, no two alike.

    fetch copies the files' bytes and never decodes them, so any distinct JPEGs will do; the
    layouts built from them below are the ones of the real archive (see test_the_replica_itself).
    """
    rng = np.random.default_rng(0)
    generated = {}
    for label in ("cat", "dog"):
        for i in range(PER_CLASS):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
            generated[f"train/{label}.{i}.jpg"] = buffer.getvalue()
    assert len(set(generated.values())) == len(generated)
    return generated


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def competition_zip(path: Path, photos: dict[str, bytes]) -> Path:
    """dogs-vs-cats.zip as Kaggle serves it: train.zip, test1.zip, sampleSubmission.csv."""
    train = io.BytesIO()
    with zipfile.ZipFile(train, "w") as archive:
        for name, data in photos.items():
            archive.writestr(name, data)
    test1 = io.BytesIO()
    with zipfile.ZipFile(test1, "w") as archive:
        archive.writestr("test1/1.jpg", next(iter(photos.values())))
    return write_zip(
        path,
        {"sampleSubmission.csv": b"id,label\n1,0\n", "test1.zip": test1.getvalue(), "train.zip": train.getvalue()},
    )


def check_catalog(out: Path, photos: dict[str, bytes]) -> pd.DataFrame:
    catalog = pd.read_csv(out / "catalog.csv")
    assert len(catalog) == len(photos)
    assert catalog.groupby("label")["index"].apply(sorted).to_dict() == {
        "cat": list(range(PER_CLASS)),
        "dog": list(range(PER_CLASS)),
    }
    for row in catalog.itertuples():
        # Each image is the archive's bytes, filed under its label with its own name.
        assert row.file == f"images/{row.label}/{row.label}.{row.index}.jpg"
        assert (out / row.file).read_bytes() == photos[f"train/{row.label}.{row.index}.jpg"]
    return catalog


# --- the accepted layouts ----------------------------------------------------------


@needs_replica
def test_the_replica_itself(tmp_path):
    """The whole 23,000-photo replica, read through train.zip inside dogs-vs-cats.zip."""
    out = tmp_path / "data" / "raw"
    digest = hashlib.sha256(REPLICA.read_bytes()).hexdigest()
    catalog = fetch(archive_params(REPLICA, archive_sha256=digest), out)
    assert len(catalog) == 23_000
    assert catalog.groupby("label")["index"].agg(["size", "min", "max"]).to_dict("index") == {
        "cat": {"size": 11_500, "min": 0, "max": 11_499},
        "dog": {"size": 11_500, "min": 0, "max": 11_499},
    }
    assert pd.read_csv(out / SET_ASIDE).empty
    assert not (out / "images" / "test1").exists()  # the unlabelled test photos are not labelled data
    with Image.open(out / "images" / "dog" / "dog.11499.jpg") as photo:
        assert photo.format == "JPEG" and photo.size == (128, 128)


def test_competition_zip(tmp_path, photos):
    out = tmp_path / "data" / "raw"
    fetch(archive_params(competition_zip(tmp_path / "in" / "dogs-vs-cats.zip", photos)), out)
    check_catalog(out, photos)


def test_bare_train_zip(tmp_path, photos):
    out = tmp_path / "data" / "raw"
    fetch(archive_params(write_zip(tmp_path / "in" / "train.zip", photos)), out)
    check_catalog(out, photos)


def test_extracted_train_folder(tmp_path, photos):
    folder = tmp_path / "in" / "dogs-vs-cats"
    for name, data in photos.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "test1").mkdir()
    (folder / "test1" / "1.jpg").write_bytes(b"unlabelled")
    out = tmp_path / "data" / "raw"
    fetch(archive_params(folder), out)
    check_catalog(out, photos)
    assert pd.read_csv(out / SET_ASIDE).empty  # test1/ is not read at all


def test_extracted_competition_folder(tmp_path, photos):
    """Unzipping dogs-vs-cats.zip gives a folder holding train.zip."""
    folder = tmp_path / "in"
    with zipfile.ZipFile(competition_zip(tmp_path / "c.zip", photos)) as archive:
        archive.extractall(folder)
    out = tmp_path / "data" / "raw"
    fetch(archive_params(folder), out)
    check_catalog(out, photos)


def test_the_dogs_vs_cats_preset_finds_the_replica_from_the_repo_root(monkeypatch, repo_root):
    """The preset's relative path is relative to the repo root, where DVC runs the stage."""
    import yaml

    preset = yaml.safe_load((repo_root / "conf" / "dataset" / "dogs_vs_cats.yaml").read_text())
    params = FetchParams.model_validate(preset["fetch"])
    assert params.source == "archive"
    if not REPLICA.is_file():
        pytest.skip(f"the offline replica is not at {REPLICA.relative_to(repo_root.parent)}")
    assert (repo_root / params.archive).resolve() == REPLICA.resolve()
    assert hashlib.sha256(REPLICA.read_bytes()).hexdigest() == params.archive_sha256


# --- URLs ----------------------------------------------------------------------------


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves one file over real HTTP on localhost; the first `failures` requests get `status` (a 503)."""

    def __init__(
        self, payload: bytes, failures: int = 0, truncate: bool = False, seconds: float = 0.0, status: int = 503
    ):
        self.payload, self.failures, self.truncate, self.requests = payload, failures, truncate, 0
        self.status = status
        self.seconds = seconds  # how long sending the body takes: a slow network
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name: str = "train.zip") -> str:
        # No credentials: params refuse them (tests/test_no_secrets.py reads them from netrc).
        return f"http://127.0.0.1:{self.server_address[1]}/files/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests += 1
        if server.requests <= server.failures:
            self.send_error(server.status, "refused")
            return
        body = server.payload[: len(server.payload) // 2] if server.truncate else server.payload
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.payload)))
        self.end_headers()
        pieces = 10 if server.seconds else 1
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            time.sleep(server.seconds / pieces)
            self.wfile.write(body[start : start + step])
            self.wfile.flush()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve():
    servers = []

    def start(payload, **kwargs):
        servers.append(FlakyServer(payload, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_url_with_a_transient_error_is_retried_then_reused(tmp_path, photos, serve, caplog):
    payload = write_zip(tmp_path / "train.zip", photos).read_bytes()
    server = serve(payload, failures=2)
    params = archive_params(server.url(), archive_sha256=hashlib.sha256(payload).hexdigest(), download_retries=3)
    out = tmp_path / "data" / "raw"
    fetch(params, out)
    check_catalog(out, photos)
    assert server.requests == 3
    assert (downloads_dir() / "train.zip").read_bytes() == payload
    assert "retry 2 of 3" in caplog.text and "HTTP 503" in caplog.text
    # A second fetch uses the verified download: no request at all.
    fetch(params, out)
    assert server.requests == 3


def test_url_gives_up_after_the_retries_and_keeps_the_old_output(tmp_path, serve):
    server = serve(b"never served", failures=10)
    out = tmp_path / "data" / "raw"
    out.mkdir(parents=True)
    (out / "catalog.csv").write_text("old\n")
    with pytest.raises(
        DataError, match=r"^could not download http://127.0.0.1:\d+/files/train.zip after 3 tries: HTTP 503"
    ):
        fetch(archive_params(server.url(), download_retries=2), out)
    assert server.requests == 3
    assert (out / "catalog.csv").read_text() == "old\n"


def test_url_download_cut_short_is_not_kept(tmp_path, photos, serve):
    payload = write_zip(tmp_path / "train.zip", photos).read_bytes()
    server = serve(payload, truncate=True)
    with pytest.raises(DataError, match="after 2 tries"):
        fetch(archive_params(server.url(), download_retries=1), tmp_path / "data" / "raw")
    assert server.requests == 2
    assert [path.name for path in downloads_dir().iterdir()] == ["train.zip.lock"]  # no partial file


def test_two_fetches_of_one_url_at_once_share_one_download(tmp_path, photos, serve):
    """Two runs on one machine (two workers, one user cache) fetch the same archive at the same time.

    The second waits for the first's download and reads the finished file: one request, one good
    copy in the cache, no partial file left, and the same catalog for both.
    """
    payload = write_zip(tmp_path / "train.zip", photos).read_bytes()
    server = serve(payload, seconds=1.0)  # the second fetch starts while the first is still receiving
    params = archive_params(server.url())
    outs = [tmp_path / run / "data" / "raw" for run in ("run-1", "run-2")]
    with ThreadPoolExecutor(2) as runs:
        catalogs = list(runs.map(lambda out: fetch(params, out), outs))
    for out in outs:
        check_catalog(out, photos)
    pd.testing.assert_frame_equal(catalogs[0], catalogs[1])
    assert server.requests == 1
    assert (downloads_dir() / "train.zip").read_bytes() == payload
    assert sorted(path.name for path in downloads_dir().iterdir()) == [
        "train.zip",
        "train.zip.lock",  # kept: removing a lock file another run may be waiting on would break the lock
        "train.zip.verified",
    ]


@pytest.fixture
def download_tries(monkeypatch) -> list[str]:
    """The URLs convnets.downloads fetched, one entry per try."""
    from convnets import downloads

    tries, real = [], downloads.fetch_to

    def counted(url, path):
        tries.append(url)
        return real(url, path)

    monkeypatch.setattr(downloads, "fetch_to", counted)
    return tries


def test_url_that_is_not_found_fails_at_once(tmp_path, download_tries, caplog):
    url = "file:///nonexistent/train.zip"
    with pytest.raises(DataError) as info:
        fetch(archive_params(url, download_retries=3), tmp_path / "data" / "raw")
    assert str(info.value) == f"could not download {url}: the file does not exist"
    assert download_tries == [url]  # tried once: no retry can make the file appear
    assert "retry" not in caplog.text


def stage_failure_of_fetch(tmp_path, capsys, fetch_params: dict):
    """What the flow makes of the fetch stage's failure: its stderr as DVC's output, through pipeline.dvc."""
    import yaml

    from conftest import default_params
    from convnets.fetch import main
    from pipeline import dvc

    params = default_params()
    params["fetch"] = {"source": "archive", "retry_backoff_s": 0.0, **fetch_params}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main([str(tmp_path / "data" / "raw"), "--params", str(tmp_path / "params.yaml")]) == 1
    printed = capsys.readouterr().err.splitlines()
    lines = (
        "Running stage 'fetch':",
        "> python -m convnets.fetch data/raw",
        *printed,
        "ERROR: failed to reproduce 'fetch': failed to run: python -m convnets.fetch data/raw, exited with 1",
    )
    return dvc.stage_failure("fetch", dvc.DvcRun(("repro",), 1, lines))


@pytest.mark.parametrize("where", ["missing", "a-folder"])
def test_a_local_file_that_cannot_be_read_fails_the_flow_once(tmp_path, capsys, download_tries, where):
    """Not a network hiccup: fetch tries it once and the flow does not retry the stage."""
    from pipeline import dvc

    url = "file:///nonexistent/train.zip" if where == "missing" else (tmp_path / "folder").as_uri()
    (tmp_path / "folder").mkdir()
    failure = stage_failure_of_fetch(tmp_path, capsys, {"archive": url, "download_retries": 3})
    assert type(failure) is dvc.StageFailed
    assert download_tries == [url]
    assert f"could not download {url}: " in str(failure) and "tries" not in str(failure)
    if where == "missing":
        assert "the file does not exist" in str(failure)


def test_a_download_that_failed_every_retry_is_retried_by_the_flow(tmp_path, capsys, download_tries, photos, serve):
    payload = write_zip(tmp_path / "train.zip", photos).read_bytes()
    server = serve(payload, truncate=True)
    failure = stage_failure_of_fetch(tmp_path, capsys, {"archive": server.url(), "download_retries": 2})
    from pipeline import dvc

    assert type(failure) is dvc.TransientStageError
    assert len(download_tries) == server.requests == 3
    assert "after 3 tries: got" in str(failure)


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_a_url_refused_on_every_retry_is_retried_by_the_flow(tmp_path, capsys, serve, status):
    """The same rule and the same message as for Kaggle (test_data_kaggle): the flow tries the stage again."""
    from pipeline import dvc, tasks

    server = serve(b"never served", failures=10, status=status)
    failure = stage_failure_of_fetch(tmp_path, capsys, {"archive": server.url(), "download_retries": 2})
    assert type(failure) is dvc.TransientStageError, str(failure)
    assert f"could not download {server.url()} after 3 tries: HTTP {status}" in str(failure)
    assert server.requests == 3
    assert tasks.retry_if_transient(None, None, Failed(data=failure))


def test_a_url_with_another_checksum_fails_the_flow_at_once(tmp_path, capsys, photos, serve):
    """A complete file with the wrong SHA-256 is a bad file, or a wrong archive_sha256: no retry changes it."""
    from pipeline import dvc

    server = serve(write_zip(tmp_path / "train.zip", photos).read_bytes())
    fetch_params = {"archive": server.url(), "archive_sha256": "0" * 64, "download_retries": 3}
    failure = stage_failure_of_fetch(tmp_path, capsys, fetch_params)
    assert type(failure) is dvc.StageFailed, str(failure)
    assert f"could not download {server.url()}: SHA-256 " in str(failure)
    assert server.requests == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_url_refused_for_good_fails_the_flow_at_once(tmp_path, capsys, serve, status):
    from pipeline import dvc, tasks

    server = serve(b"never served", failures=10, status=status)
    failure = stage_failure_of_fetch(tmp_path, capsys, {"archive": server.url(), "download_retries": 3})
    assert type(failure) is dvc.StageFailed, str(failure)
    assert f"could not download {server.url()}: HTTP {status}" in str(failure) and "tries" not in str(failure)
    assert server.requests == 1
    assert not tasks.retry_if_transient(None, None, Failed(data=failure))


# --- refusals ------------------------------------------------------------------------


def test_wrong_sha256_is_refused(tmp_path, photos):
    archive = write_zip(tmp_path / "train.zip", photos)
    with pytest.raises(DataError, match="not fetch.archive_sha256"):
        fetch(archive_params(archive, archive_sha256="0" * 64), tmp_path / "data" / "raw")
    assert not (tmp_path / "data" / "raw").exists()


def test_missing_archive_says_where_relative_paths_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError, match=r"fetch.archive nope/dogs-vs-cats.zip not found \(relative paths start at the repo root"
    ):
        fetch(archive_params("nope/dogs-vs-cats.zip"), tmp_path / "data" / "raw")


def test_archive_source_needs_a_location():
    with pytest.raises(ValueError, match="fetch.archive must name"):
        FetchParams(source="archive")


def test_not_a_zip_is_a_clear_error(tmp_path):
    bogus = tmp_path / "dogs-vs-cats.zip"
    bogus.write_bytes(b"<html>login page</html>")
    with pytest.raises(DataError, match="is not a readable zip archive"):
        fetch(archive_params(bogus), tmp_path / "data" / "raw")


def test_a_zip_without_labelled_images_says_what_it_found(tmp_path):
    archive = write_zip(tmp_path / "photos.zip", {"holiday/IMG_0001.jpg": b"x", "notes.txt": b"y"})
    with pytest.raises(DataError, match=r"no labelled images .* \(set aside: 1 not_an_image_file, 1 unlabelled_name\)"):
        fetch(archive_params(archive), tmp_path / "data" / "raw")


def test_extraction_is_bounded(tmp_path, photos):
    archive = write_zip(tmp_path / "train.zip", photos)
    total = sum(len(data) for data in photos.values())
    out = tmp_path / "data" / "raw"
    with pytest.raises(
        DataError, match=rf"would extract to {total:,} bytes, more than fetch.max_extract_bytes \(1,000\)"
    ):
        fetch(archive_params(archive, max_extract_bytes=1000), out)
    assert not out.exists() and os.listdir(out.parent) == []


def test_extraction_bound_holds_when_the_archive_lies_about_sizes(tmp_path):
    """A member whose header understates its size cannot write more than the bound."""
    from convnets.archive import Budget, Member, copy_member

    big = io.BytesIO(b"x" * 5000)
    liar = Member("train/cat.0.jpg", size=10, is_file=True, open=lambda: big)
    target = tmp_path / "data" / "raw" / "cat.0.jpg"
    with pytest.raises(DataError, match="extracted more than its directory declared"):
        copy_member(liar, target, Budget(1000, "train.zip"))
    assert not target.exists()


def test_entries_that_are_not_usable_are_set_aside_with_their_reason(tmp_path, photos, monkeypatch):
    photo = photos["train/cat.0.jpg"]
    members = {
        "train/cat.0.jpg": photo,
        "train/dog.0.jpg": photo,
        "train/Thumbs.db": b"\xd0\xcf\x11\xe0 thumbnail cache",
        "train/.DS_Store": b"\0\0\0\1Bud1",
        "__MACOSX/train/._cat.0.jpg": b"resource fork",
        "train/readme.txt": b"hello",
        "train/IMG_1234.jpg": photo,
        "train/horse.1.jpg": photo,
        "train/cat.0.png": photo,
        "train/../../../escape.jpg": photo,
        "../cat.5.jpg": photo,
        f"{tmp_path}/abs/dog.6.jpg": photo,
        "C:\\windows\\cat.7.jpg": photo,
    }
    archive = write_zip(tmp_path / "in" / "train.zip", members)
    with zipfile.ZipFile(archive, "a") as zf:  # a symbolic link member pointing outside
        link = zipfile.ZipInfo("train/dog.1.jpg")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # extraction must not depend on (or write to) the working directory
    catalog = fetch(archive_params(archive), project / "data" / "raw")
    assert sorted(catalog["file"]) == ["images/cat/cat.0.jpg", "images/dog/dog.0.jpg"]
    set_aside = pd.read_csv(project / "data" / "raw" / SET_ASIDE, keep_default_na=False)
    reasons = dict(zip(set_aside["file"], set_aside["reason"]))
    assert reasons == {
        "train/Thumbs.db": "not_an_image_file",
        "train/.DS_Store": "not_an_image_file",
        "__MACOSX/train/._cat.0.jpg": "not_an_image_file",
        "train/readme.txt": "not_an_image_file",
        "train/IMG_1234.jpg": "unlabelled_name",
        "train/horse.1.jpg": "unknown_class",
        "train/cat.0.png": "duplicate_index",
        "train/../../../escape.jpg": "unsafe_path",
        "../cat.5.jpg": "unsafe_path",
        f"{tmp_path}/abs/dog.6.jpg": "unsafe_path",
        "C:\\windows\\cat.7.jpg": "unsafe_path",
        "train/dog.1.jpg": "link_or_special_file",
    }
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "in/train.zip",
        "project/data/raw/catalog.csv",
        "project/data/raw/images/cat/cat.0.jpg",
        "project/data/raw/images/dog/dog.0.jpg",
        "project/data/raw/set_aside.csv",
    ]


def test_folder_links_are_not_followed(tmp_path, photos):
    folder = tmp_path / "in" / "train"
    folder.mkdir(parents=True)
    (folder / "cat.0.jpg").write_bytes(photos["train/cat.0.jpg"])
    (folder / "dog.0.jpg").write_bytes(photos["train/dog.0.jpg"])
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (folder / "dog.1.jpg").symlink_to(secret)
    (folder / "more").symlink_to(tmp_path, target_is_directory=True)
    out = tmp_path / "data" / "raw"
    catalog = fetch(archive_params(folder.parent), out)
    assert len(catalog) == 2
    set_aside = pd.read_csv(out / SET_ASIDE)
    assert sorted(zip(set_aside["file"], set_aside["reason"])) == [
        ("train/dog.1.jpg", "link_or_special_file"),
        ("train/more", "link_or_special_file"),
    ]


def test_a_missing_class_is_an_error(tmp_path, photos):
    cats = {name: data for name, data in photos.items() if "/cat." in name}
    with pytest.raises(DataError, match="holds no images of class dog"):
        fetch(archive_params(write_zip(tmp_path / "train.zip", cats)), tmp_path / "data" / "raw")


def test_fetch_stage_command_line(tmp_path, photos, capsys):
    """The stage entry point: a summary line, no progress bar in a non-terminal, exit 0."""
    import yaml

    from conftest import default_params
    from convnets.fetch import main

    params = default_params()
    params["fetch"] = {"source": "archive", "archive": str(write_zip(tmp_path / "train.zip", photos))}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main([str(tmp_path / "data" / "raw"), "--params", str(tmp_path / "params.yaml")]) == 0
    captured = capsys.readouterr()
    assert f"fetch: {2 * PER_CLASS} images in 2 classes" in captured.out
    assert "%|" not in captured.err  # tqdm stays quiet when stderr is not a terminal


def test_params_file_errors_name_the_new_keys(tmp_path):
    from conftest import write_params
    from convnets.params import load_params

    path = write_params(tmp_path / "params.yaml", {"fetch": {"source": "archive"}})
    with pytest.raises(ParamsError, match="fetch: Value error, fetch.archive must name"):
        load_params(path)
    path = write_params(tmp_path / "params.yaml", {"preprocess": {"max_bad_fraction": 1.5}})
    with pytest.raises(ParamsError, match="preprocess.max_bad_fraction: Input should be less than or equal to 1"):
        load_params(path)


def test_a_damaged_member_is_set_aside_and_the_rest_extracted(tmp_path, photos):
    archive = write_zip(tmp_path / "train.zip", photos)
    data = bytearray(archive.read_bytes())
    photo = photos["train/cat.3.jpg"]
    data[data.index(photo) + 100] ^= 0xFF  # one flipped bit in a stored member: its CRC fails
    archive.write_bytes(bytes(data))
    out = tmp_path / "data" / "raw"
    catalog = fetch(archive_params(archive), out)
    assert len(catalog) == 2 * PER_CLASS - 1 and "images/cat/cat.3.jpg" not in set(catalog["file"])
    set_aside = pd.read_csv(out / SET_ASIDE)
    assert set_aside[["file", "label", "reason"]].values.tolist() == [["train/cat.3.jpg", "cat", "damaged_in_archive"]]
    assert "Bad CRC-32" in set_aside["detail"][0]
    assert not (out / "images" / "cat" / "cat.3.jpg").exists()


def test_a_failing_write_stops_the_stage(tmp_path, photos, monkeypatch):
    """Disk full is not a damaged photo: the stage stops instead of setting every file aside."""
    import builtins

    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".jpg"):

            def write(data):
                raise OSError(28, "No space left on device")

            handle.write = write
        return handle

    archive = write_zip(tmp_path / "train.zip", photos)
    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fetch(archive_params(archive), tmp_path / "data" / "raw")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == []
