"""No secret in params: a URL with credentials, or an override that interpolates, is refused in one line.

A token is planted in each way a user could hand one over (user:password@, a query-string
token or signature, `${oc.env:...}`); everything this machine produces without a fleet (the
sweep's points and checks, composed params, params loading, the fetch stage's error, experiment
names, logs) is searched for it. Credentials go in ~/.netrc or the environment instead, and the
downloader reads them from there.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import zipfile

import pytest
import yaml

from conftest import default_params
from convnets.errors import ParamsError
from convnets.fetch import fetch
from convnets.layout import downloads_dir
from convnets.params import FetchParams, load_params
from pipeline import grid
from pipeline.__main__ import main  # sets PREFECT_SERVER_ANALYTICS_ENABLED on import: at collection, as elsewhere
from pipeline.grid import Point, SweepError
from pipeline.overrides import OverridesError, apply_overrides, compose_params

TOKEN = "s3cr3tTok42"

SECRET_OVERRIDES = [
    f"fetch.archive=https://alice:{TOKEN}@example.com/dogs-vs-cats.zip",
    f"fetch.archive=https://{TOKEN}@github.com/o/r/releases/download/v1/train.zip",
    f"fetch.archive=https://example.com/train.zip?token={TOKEN}",
    f"fetch.mnist_url=https://b.s3.amazonaws.com/mnist.npz?X-Amz-Credential=AKIA&X-Amz-Signature={TOKEN}",
    f"fetch.archive=https://acct.blob.core.windows.net/c/train.zip?sv=2022-11-02&sig={TOKEN}",
    f"fetch.archive=https://example.com/a.zip,https://alice:{TOKEN}@example.com/b.zip",  # a sweep's second value
    f"fetch.archive='https://example.com/a.zip?part=1,2&access_token={TOKEN}'",  # quoted, commas in the query
    f"fetch.archive=https\\://alice\\:{TOKEN}@example.com/a.zip",  # escaped, as a sweep's point carries it
]


def assert_secret_free(*texts) -> None:
    for text in texts:
        assert TOKEN not in str(text)


def assert_one_line_saying_where_credentials_go(message: str) -> None:
    assert "\n" not in message
    assert "netrc" in message and "AWS_ACCESS_KEY_ID" in message and "GOOGLE_APPLICATION_CREDENTIALS" in message
    assert_secret_free(message)


@pytest.mark.parametrize("override", SECRET_OVERRIDES)
def test_the_sweep_refuses_credentials_in_an_override_before_anything_else(repo_root, override, caplog):
    with pytest.raises(SweepError) as made:
        grid.make_points(["seed=1,2", override], "sweep")
    key = override.split("=", 1)[0]
    assert str(made.value).startswith(f"-S {key}=...: ")
    assert_one_line_saying_where_credentials_go(str(made.value))
    # a point made some other way (the nightly's) is refused by check_point, with or without validation
    for validate in (True, False):
        with pytest.raises(SweepError) as checked:
            grid.check_point(repo_root, Point((override,), "nightly-0123456"), validate=validate)
        assert_one_line_saying_where_credentials_go(str(checked.value))
    assert_secret_free(caplog.text)


def test_an_override_that_interpolates_is_refused(repo_root, tmp_path, monkeypatch, caplog):
    """DVC's composition resolves ${oc.env:...}: the worker's secret would land in the committed params.yaml."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TOKEN)
    override = "fetch.mnist_url=${oc.env:AWS_SECRET_ACCESS_KEY}"
    with pytest.raises(SweepError) as made:
        grid.make_points([override], "sweep")
    with pytest.raises(SweepError) as checked:
        grid.check_point(repo_root, Point((override,), "n"))
    target = tmp_path / "params.yaml"
    with pytest.raises(OverridesError) as composed:
        compose_params(repo_root, [override], target)
    assert not target.exists()
    for message in (str(made.value), str(checked.value), str(composed.value)):
        assert "interpolat" in message and "\n" not in message
        assert "AWS_SECRET_ACCESS_KEY" not in message  # not even the variable's name is echoed
        assert_secret_free(message)
    assert_secret_free(caplog.text)


def test_composing_or_applying_overrides_with_credentials_writes_nothing(repo_root, tmp_path):
    target = tmp_path / "composed" / "params.yaml"
    target.parent.mkdir()
    with pytest.raises(OverridesError) as composed:
        compose_params(repo_root, [SECRET_OVERRIDES[0]], target)
    assert not target.exists()
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(OverridesError) as applied:  # refused before DVC or any params file is touched
        apply_overrides(project, ["seed=3", SECRET_OVERRIDES[2]])
    assert list(project.iterdir()) == []
    for message in (str(composed.value), str(applied.value)):
        assert_one_line_saying_where_credentials_go(message)


def test_clean_overrides_still_pass_and_compose_nothing_secret(repo_root):
    (point,) = grid.make_points(["dataset=dogs_vs_cats", "fetch.archive='https://example.com/a.zip?v=2'"], "s")
    params = grid.check_point(repo_root, point)
    assert params["fetch"]["archive"] == "https://example.com/a.zip?v=2"  # a plain query string is no secret
    with pytest.raises(SweepError):  # the same sweep with a token planted is refused
        grid.make_points(["dataset=dogs_vs_cats", f"fetch.archive='https://example.com/a.zip?v=2&token={TOKEN}'"], "s")


@pytest.mark.parametrize("key", ["archive", "mnist_url"])
@pytest.mark.parametrize("override", SECRET_OVERRIDES[:5])
def test_params_loading_refuses_credentials_so_dvc_repro_does_too(tmp_path, key, override):
    url = override.split("=", 1)[1]
    params = default_params()
    params["fetch"][key] = url
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: fetch.{key}: a URL with ")
    assert_one_line_saying_where_credentials_go(message)
    with pytest.raises(ValueError) as direct:  # built in Python: pydantic's own error hides the input too
        FetchParams(**{key: url})
    assert_secret_free(str(direct.value))


def test_the_fetch_stage_refuses_credentials_and_downloads_nothing(tmp_path, capsys):
    from convnets.fetch import main

    params = default_params()
    params["fetch"] = {"source": "archive", "archive": f"http://alice:{TOKEN}@127.0.0.1:9/train.zip"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main([str(tmp_path / "data" / "raw"), "--params", str(tmp_path / "params.yaml")]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: invalid parameters\n")
    assert_one_line_saying_where_credentials_go(printed.err.splitlines()[1])
    assert_secret_free(printed.out, printed.err)
    assert not (tmp_path / "data").exists() and not downloads_dir().exists()


def test_experiment_names_never_carry_credentials():
    names = [grid.experiment_name("sweep", [override]) for override in SECRET_OVERRIDES]
    names += [grid.experiment_name("sweep", ["seed=1"], [override]) for override in SECRET_OVERRIDES]
    names += [
        grid.experiment_name("sweep", [override, "model.conv_filters=[32,64,128,256]"] * 3)
        for override in SECRET_OVERRIDES
    ]
    assert_secret_free(*names)
    assert grid.experiment_name("sweep", [SECRET_OVERRIDES[0]]).startswith("sweep-fetch.archive")
    assert (
        grid.experiment_name("s", ["fetch.archive=https://example.com/a.zip"])
        == "s-fetch.archive-https-example.com-a.zip"
    )


class BasicAuthServer(http.server.ThreadingHTTPServer):
    """Serves one file to whoever sends alice's password; a 401 to anyone else."""

    def __init__(self, payload: bytes):
        self.payload, self.authorizations = payload, []
        super().__init__(("127.0.0.1", 0), AuthHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class AuthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sent = self.headers.get("Authorization")
        self.server.authorizations.append(sent)
        if sent != "Basic " + base64.b64encode(f"alice:{TOKEN}".encode()).decode():
            self.send_error(401, "who are you")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, *args):
        pass


def test_the_downloader_reads_credentials_from_netrc_and_logs_none(tmp_path, monkeypatch, caplog):
    """Where the refusal sends them: ~/.netrc (here the file $NETRC names) for http(s)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train/cat.0.jpg", b"cat")
        archive.writestr("train/dog.0.jpg", b"dog")
    server = BasicAuthServer(buffer.getvalue())
    try:
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login alice password {TOKEN}\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        url = f"http://127.0.0.1:{server.server_address[1]}/files/train.zip"
        catalog = fetch(FetchParams(source="archive", archive=url, retry_backoff_s=0.0), tmp_path / "raw")
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(catalog["label"]) == ["cat", "dog"]
    assert len(server.authorizations) == 1 and server.authorizations[0]
    assert_secret_free(caplog.text, catalog.to_csv())


@pytest.mark.parametrize("command", [["sweep"], []], ids=["sweep", "pipeline"])
def test_the_command_refuses_a_secret_before_any_flow_gets_it(command, monkeypatch, capsys):
    """A flow's parameters go to the Prefect API: the command checks the overrides before calling one."""
    import pipeline.flows

    def no_flow(*args, **kwargs):
        raise AssertionError("a flow was called with the secret")

    monkeypatch.setattr(pipeline.flows, "dvc_sweep", no_flow)
    monkeypatch.setattr(pipeline.flows, "dvc_pipeline", no_flow)
    code = main([*command, "-S", "fetch.archive=https://alice:s3cr3tTok@example.org/train.zip"])
    captured = capsys.readouterr()
    assert code == 2
    assert "s3cr3tTok" not in captured.out + captured.err and captured.err.startswith("error: ")
