"""A worker runs only the repositories it was started to run, and git never takes a user's
value for an option (pipeline.workspace, docs/orchestration.md, "Workers").

The flows are called as plain functions (`.fn`) with a fake logger, and git is faked at the
subprocess boundary, so each test takes milliseconds and shows which git commands would run.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile

import pytest

# Prefect reads PREFECT_HOME when first imported (and creates it): a throw-away folder,
# never ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="convnets-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

from pipeline import flows, remote, workspace  # noqa: E402

ALLOW_LIST = "CONVNETS_TRUSTED_REPOSITORIES"
COMMIT = "a" * 40
RESOLVED = "b" * 40  # what the fake `git rev-parse` answers: git's own output, not the user's
TEAM = "https://github.com/team/convnets.git"


class ReachedClone(Exception):
    """The flow got past the allow-list to the clone."""


@pytest.fixture
def git_calls(monkeypatch) -> list[list[str]]:
    """Every git argv that pipeline.workspace and pipeline.remote run; each git call succeeds."""
    calls: list[list[str]] = []

    def fake_run(argv, *args, **kwargs):
        calls.append(list(argv))
        failing = "cat-file" in argv  # the mirror lacks the commit: it must fetch
        stdout = f"{RESOLVED}\n" if "rev-parse" in argv else ""
        return subprocess.CompletedProcess(argv, 1 if failing else 0, stdout=stdout, stderr="")

    monkeypatch.setattr(workspace.subprocess, "run", fake_run)
    return calls


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    """The lines the flow logs (its get_run_logger, outside a Prefect run)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test-trusted-repositories")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Collect())
    monkeypatch.setattr(flows, "get_run_logger", lambda: logger)
    yield lines
    logger.handlers.clear()


@pytest.fixture
def clone_reached(monkeypatch) -> None:
    """clean_checkout raises ReachedClone: the run was let through."""

    @contextlib.contextmanager
    def fake_checkout(repository: str, commit: str, label: str):
        raise ReachedClone(repository)
        yield  # pragma: no cover

    monkeypatch.setattr(workspace, "clean_checkout", fake_checkout)


def run_experiment(repository: str, dvc_remote: str | None = None) -> None:
    flows.dvc_experiment.fn(repository, COMMIT, [], "point", dvc_remote)


def run_stage(repository: str, dvc_remote: str | None = None) -> None:
    flows.dvc_stage.fn("train", COMMIT, {}, repository, dvc_remote)


def refusal(run, repository: str, dvc_remote: str | None = None) -> str:
    with pytest.raises(workspace.WorkspaceError, match="allow-list") as refused:
        run(repository, dvc_remote)
    return str(refused.value)


@pytest.mark.parametrize("run", [run_experiment, run_stage], ids=["dvc_experiment", "dvc_stage"])
def test_untrusted_repository_is_refused_before_any_git(run, monkeypatch, git_calls, logged):
    monkeypatch.setenv(ALLOW_LIST, TEAM)
    message = refusal(run, "https://github.com/other/convnets.git")
    assert git_calls == []
    assert "\n" not in message
    assert message.startswith(
        "repository https://github.com/other/convnets.git is not on this worker's allow-list "
        "(CONVNETS_TRUSTED_REPOSITORIES): "
    )
    assert "https://github.com/team/convnets" in message  # says what it does run


def test_trusted_repositories_proceed_by_exact_url_or_prefix(monkeypatch, logged, clone_reached):
    monkeypatch.setenv(ALLOW_LIST, f"{TEAM}, https://github.com/lab/ /srv/git")
    for trusted in (
        "https://github.com/team/convnets",  # the same repository without .git
        "HTTPS://GitHub.com/team/convnets.git/",
        "https://github.com/lab/anything.git",  # under a prefix
        "/srv/git/convnets.git",
    ):
        with pytest.raises(ReachedClone):
            run_experiment(trusted)
    for untrusted in (
        "https://github.com/team/convnets-fork.git",  # a prefix matches whole path segments only
        "https://github.com/laboratory/convnets.git",
        "https://github.com/lab/../other/convnets.git",
        "/srv/git-old/convnets.git",
        "ssh://github.com/team/convnets.git",  # another scheme, another server
    ):
        refusal(run_experiment, untrusted)
    assert not any("any repository" in line for line in logged)


def test_credentials_neither_defeat_the_match_nor_show(monkeypatch, logged, clone_reached):
    monkeypatch.setenv(ALLOW_LIST, "https://github.com/team/")
    with pytest.raises(ReachedClone):
        run_experiment("https://alice:s3cret@github.com/team/convnets.git")
    for untrusted in (
        "https://alice:s3cret@evil.example/team/convnets.git",
        "https://github.com:s3cret@evil.example/team/convnets.git",  # github.com is the user here
    ):
        message = refusal(run_experiment, untrusted)
        assert "s3cret" not in message
        assert "evil.example/team/convnets.git" in message


def test_a_worker_without_an_allow_list_says_it_runs_any_repository(monkeypatch, logged, clone_reached):
    monkeypatch.delenv(ALLOW_LIST, raising=False)
    with pytest.raises(ReachedClone):
        run_stage("https://github.com/anyone/convnets.git")
    said = [line for line in logged if "runs any repository" in line]
    assert len(said) == 1 and ALLOW_LIST in said[0]


def test_the_dvc_remote_is_checked_too(monkeypatch, git_calls, logged):
    monkeypatch.setenv(ALLOW_LIST, f"{TEAM} s3://team-dvc/convnets")
    message = refusal(run_experiment, TEAM, "s3://someone-else/dvc")
    assert message.startswith("DVC remote s3://someone-else/dvc is not on this worker's allow-list")
    assert git_calls == []


@pytest.mark.parametrize(
    ("repository", "commit"),
    [("--upload-pack=touch /tmp/owned", COMMIT), (TEAM, "--orphan=x"), ("-u", COMMIT)],
)
def test_a_repository_or_commit_starting_with_a_dash_is_refused(repository, commit, git_calls, tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path))
    with pytest.raises(workspace.WorkspaceError, match="starts with '-'"):
        with workspace.clean_checkout(repository, commit, "dash"):
            pass
    assert git_calls == []


def after_end_of_options(argv: list[str], value: str) -> bool:
    """`value` is in argv only where git can no longer read it as an option."""
    ends = [i for i, arg in enumerate(argv) if arg in ("--", "--end-of-options")]
    return all(ends and ends[0] < i for i, arg in enumerate(argv) if value in arg)


def test_git_gets_double_dash_before_every_user_value(git_calls, tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.GIT_MIRRORS_ENV, str(tmp_path / "mirrors"))
    repository = "https://github.com/team/convnets.git"
    with workspace.clean_checkout(repository, COMMIT, "dashes"):
        pass
    workspace.ls_remote(repository, "refs/heads/main")
    remote.git_remote_url(tmp_path, "upstream")
    commands = [argv for argv in git_calls if any(v in " ".join(argv) for v in (repository, COMMIT, "upstream"))]
    for argv in commands:
        for value in (repository, COMMIT, "upstream", "refs/heads/main"):
            assert after_end_of_options(argv, value), argv
    assert {next(a for a in argv[1:] if not a.startswith("--git-dir")) for argv in commands} >= {
        "fetch",
        "rev-parse",
        "remote",
        "ls-remote",
    }
