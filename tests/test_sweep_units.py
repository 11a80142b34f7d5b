"""Sweep building blocks without a server: the grid, names, params checks, the table, the worker's checks."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import git
from pipeline import grid, results, sweep, waiting, workspace
from pipeline.grid import Point, SweepError


def test_the_grid_is_every_combination_in_dvcs_comma_syntax():
    points = grid.make_points(["train.learning_rate=0.001,0.0001", "seed=1,2,3"], "sweep")
    assert [p.overrides for p in points] == [
        (f"train.learning_rate={lr}", f"seed={seed}") for lr in ("0.001", "0.0001") for seed in (1, 2, 3)
    ]
    assert points[0].name == "sweep-train.learning_rate-0.001-seed-1"
    presets = grid.make_points(["+experiment=scratch,augmented,mini_xception"], "book")
    assert [p.name for p in presets] == [
        "book-experiment-scratch",
        "book-experiment-augmented",
        "book-experiment-mini_xception",
    ]
    assert grid.make_points([], "nightly") == [Point((), "nightly-defaults")]


def test_names_show_what_varies_and_keep_apart_what_does_not():
    three = grid.make_points(["seed=1,2", "train.epochs=3"], "s")
    five = grid.make_points(["seed=1,2", "train.epochs=5"], "s")
    assert three[0].name.startswith("s-seed-1-") and three[1].name.startswith("s-seed-2-")
    assert {p.name for p in three}.isdisjoint(p.name for p in five)  # a rerun never takes one for the other
    (single,) = grid.make_points(["train.epochs=20"], "preempted")
    assert re.fullmatch(r"preempted-[0-9a-f]{6}", single.name)


def test_long_names_stay_readable_and_distinct():
    a = grid.experiment_name("s", ["model.conv_filters=[32,64,128,256,256]"] * 3)
    b = grid.experiment_name("s", ["model.conv_filters=[32,64,128,256,512]"] * 3)
    assert len(a) <= grid.MAX_NAME and a != b and a.startswith("s-model.conv_filters-32-64")
    with pytest.raises(SweepError, match="--name-prefix"):
        grid.make_points(["seed=1"], "bad prefix")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+experiment=nope", "Could not find 'experiment/nope'"),
        ("train.nope=1", "Could not override 'train.nope'"),
        ("train.epochs=-1", r"train.epochs: Input should be greater than 0"),
        ("seed=1,,", "cannot read the -S overrides"),
    ],
)
def test_a_bad_key_preset_or_value_is_named_before_anything_is_submitted(repo_root, override, message):
    with pytest.raises(SweepError, match=message):
        for point in grid.make_points([override], "sweep"):
            grid.check_point(repo_root, point)


def test_points_with_the_same_data_params_share_one_data_run(repo_root):
    keys = grid.data_params(repo_root, ["fetch", "split", "preprocess"])
    assert keys == ["fetch", "seed", "split", "preprocess"]
    params = {p: grid.check_point(repo_root, p) for p in grid.make_points(["train.epochs=1,2", "seed=1,2"], "s")}
    groups = {grid.data_key(v, keys) for v in params.values()}
    assert len(groups) == 2  # two seeds (the split reads it); the epochs do not matter to the data


def outcome(name: str, status: str, message: str = "") -> results.Outcome:
    return results.Outcome(
        Point((f"seed={name}",), name), status=status, message=message, host="gpu-1", attempts=1, seconds=75.2
    )


def board(outcomes: list[results.Outcome], best_first: list[str]) -> list[dict[str, str]]:
    """The sweep's table, with compare's rows (best test accuracy first) for the experiments `best_first`."""
    compared = [{"experiment": name, "test accuracy": f"0.{9 - i}000"} for i, name in enumerate(best_first)]
    return results.leaderboard(["experiment", "test accuracy"], compared, results.point_rows(outcomes))


def test_the_leaderboard_keeps_compares_order_and_puts_failures_last_with_their_error():
    outcomes = [
        outcome("a", "done"),
        outcome("b", "failed", message="stage 'train' failed: error: boom\nmore"),
        outcome("c", "already done"),
    ]
    rows = board(outcomes, ["c", "a"])
    assert [r["experiment"] for r in rows] == ["c", "a", "b"]
    assert rows[0] == {
        "experiment": "c",
        "test accuracy": "0.9000",
        "status": "already done",
        "worker": "gpu-1",
        "attempts": "1",
        "wall time": "1m 15s",
    }
    assert rows[2]["status"] == "failed: stage 'train' failed: error: boom" and rows[2]["test accuracy"] == ""
    table = results.text_table(rows)
    header = table.splitlines()[0].split()
    assert header[:3] == ["experiment", "test", "accuracy"] and len(table.splitlines()) == 4  # the figures first
    failed = results.ExperimentsFailed(outcomes, rows)
    assert failed.failed == ["b"] and "1 experiment(s) failed: b (failed)" in str(failed)


def test_the_printed_command_pulls_the_best_experiments_outputs_before_applying_it():
    rows = board([outcome("a", "done"), outcome("c", "already done")], ["c", "a"])
    assert results.bring_home_command(rows, "origin") == "dvc exp pull origin c && dvc exp apply c"
    failed = board([outcome("b", "failed", message="stage 'train' failed")], [])
    assert results.bring_home_command(failed, "origin") is None  # nothing came home: nothing to bring


def test_experiments_already_on_the_git_remote_are_found_by_their_baseline(tmp_path):
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "f").write_text("x")
    git(work, "add", "f")
    git(work, "commit", "-q", "-m", "x")
    commit = git(work, "rev-parse", "HEAD").strip()
    git(work, "update-ref", f"refs/exps/{commit[:2]}/{commit[2:]}/sweep-seed-1", commit)
    git(work, "update-ref", f"refs/exps/{'0' * 2}/{'0' * 38}/other-commit", commit)
    git(work, "push", "-q", str(origin), "refs/exps/*:refs/exps/*")
    assert sweep.experiments_on_remote(str(origin), commit) == {"sweep-seed-1"}
    with pytest.raises(SweepError, match="cannot list the experiments"):
        sweep.experiments_on_remote(str(tmp_path / "missing.git"), commit)


def test_a_commit_missing_from_the_remote_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    origin = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True)
    (origin / "f").write_text("x")
    git(origin, "add", "f")
    git(origin, "commit", "-q", "-m", "x")
    with pytest.raises(workspace.WorkspaceError, match="commit 0000000 is not on .*: push it"):
        with workspace.clean_checkout(str(origin), "0" * 40, "x"):
            pass
    with workspace.clean_checkout(str(origin), git(origin, "rev-parse", "HEAD").strip(), "ok") as checkout:
        assert (checkout / "f").read_text() == "x"
    assert list((tmp_path / "runs").iterdir()) == []  # removed afterwards
    with pytest.raises(workspace.KeepCheckout):
        with workspace.clean_checkout(str(origin), git(origin, "rev-parse", "HEAD").strip(), "kept") as checkout:
            raise workspace.KeepCheckout("push refused")
    assert checkout.is_dir()  # an experiment git refused stays where the message says


def test_secrets_in_urls_never_reach_messages():
    assert workspace.redact("https://user:s3cret@example.com/r.git") == "https://***@example.com/r.git"
    assert workspace.redact("/srv/git/r.git") == "/srv/git/r.git"
    # what other machines are told: no token; each worker clones with its own credentials
    assert (
        workspace.without_credentials("https://x-access-token:s3cret@example.com/r.git") == "https://example.com/r.git"
    )
    assert workspace.without_credentials("git@example.com:team/r.git") == "git@example.com:team/r.git"


def test_the_training_state_mirror_sits_beside_the_dvc_remote(monkeypatch):
    assert workspace.resume_url_beside("s3://bucket/convnets/dvc") == "s3://bucket/convnets/dvc-train-resume"
    assert workspace.resume_url_beside("s3://bucket") == "s3://bucket/convnets-train-resume"
    assert workspace.resume_url_beside("/mnt/shared/dvc/") == "/mnt/shared/dvc-train-resume"
    monkeypatch.delenv(workspace.RESUME_URL_ENV, raising=False)
    assert workspace.run_environment("/mnt/shared/dvc") == {workspace.RESUME_URL_ENV: "/mnt/shared/dvc-train-resume"}
    monkeypatch.setenv(workspace.RESUME_URL_ENV, "s3://elsewhere")  # the worker's own setting wins
    assert workspace.run_environment("/mnt/shared/dvc") == {}


def test_a_restarting_prefect_server_is_waited_for_and_loses_nothing(monkeypatch):
    """The API refuses connections for a while (a restart): the sweep keeps polling, then reads the result."""
    import uuid
    from datetime import timedelta
    from types import SimpleNamespace

    import httpx
    import prefect.client.orchestration

    run_id = uuid.uuid4()
    finished = SimpleNamespace(
        id=run_id,
        name="r",
        total_run_time=timedelta(seconds=42),
        state=SimpleNamespace(
            type=SimpleNamespace(value="COMPLETED"), name="Completed", message="", is_final=lambda: True
        ),
    )
    answers = iter([httpx.ConnectError("connection refused"), httpx.ConnectError("connection refused"), [finished]])

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_flow_runs(self, **kwargs):
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def read_workers_for_work_pool(self, pool, **kwargs):
            return [object()]

    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(waiting, "POLL_S", 0)
    logs: list[str] = []
    outcome = results.Outcome(Point(("seed=1",), "a"), flow_run_id=run_id, attempts=1)
    waiting.wait_for([outcome], "gpu", 60, logs.append)
    assert outcome.status == "done" and outcome.seconds == 42
    assert sum("did not answer" in line for line in logs) == 2


# --- a path only one machine has is refused before anything is submitted -----------------------


def preset_archive(project) -> str:
    return yaml.safe_load((project / "conf" / "dataset" / "dogs_vs_cats.yaml").read_text())["fetch"]["archive"]


def refusal(project, *overrides: str) -> str | None:
    """The one-line SweepError check_point gives the point of `overrides`, or None if it passes."""
    (point,) = grid.make_points(list(overrides), "s")
    try:
        grid.check_point(project, point)
    except SweepError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


def test_the_dogs_vs_cats_preset_archive_is_refused_naming_the_key_and_what_to_use(repo_root):
    archive = preset_archive(repo_root)
    assert archive.startswith("../")  # beside this checkout; nothing in a worker's clone
    assert refusal(repo_root, "dataset=dogs_vs_cats") == (
        f"dataset=dogs_vs_cats: fetch.archive {archive!r} is a path relative to the repository, which a "
        "worker's clone does not have: use an http(s) URL, fetch.source=kaggle, or an absolute path that "
        "every worker has"
    )
    # a file: URL with a relative path reads the same folder; so does keras' MNIST from one
    assert "fetch.archive 'file:../d.zip' is a path relative" in refusal(
        repo_root, "dataset=dogs_vs_cats", "fetch.archive=file:../d.zip"
    )
    assert "fetch.mnist_url 'file:mnist.npz' is a path relative" in refusal(
        repo_root, "fetch.source=keras", "fetch.mnist_url=file:mnist.npz"
    )
    assert "fetch.archive 'nope/d.zip'" in refusal(repo_root, "dataset=dogs_vs_cats", "fetch.archive=nope/d.zip")


@pytest.mark.parametrize(
    "overrides",
    [
        ("fetch.archive=https://example.org/dogs-vs-cats.zip",),
        ("fetch.archive=/srv/data/dogs-vs-cats.zip",),
        ("fetch.archive='~/data/dogs-vs-cats.zip'",),  # the worker's home
        ("fetch.archive=file:///srv/data/dogs-vs-cats.zip",),
        ("fetch.source=kaggle",),  # the archive key is not read then
        ("fetch.archive=conf",),  # a folder git has: every clone has it
    ],
)
def test_a_url_an_absolute_path_or_kaggle_passes(repo_root, overrides):
    assert refusal(repo_root, "dataset=dogs_vs_cats", *overrides) is None


def test_the_mnist_defaults_pass(repo_root):
    assert refusal(repo_root) is None
    assert refusal(repo_root, "fetch.source=keras") is None  # https


def test_a_relative_path_passes_only_once_git_has_it(project_copy):
    (project_copy / "in").mkdir()
    (project_copy / "in" / "d.zip").write_bytes(b"PK")
    assert "fetch.archive 'in/d.zip'" in refusal(project_copy, "dataset=dogs_vs_cats", "fetch.archive=in/d.zip")
    git(project_copy, "add", "in/d.zip")
    git(project_copy, "commit", "-q", "-m", "archive")
    assert refusal(project_copy, "dataset=dogs_vs_cats", "fetch.archive=in/d.zip") is None


def test_the_nightly_run_checks_the_branch_heads_params_in_a_clone_before_submitting(
    project_copy, tmp_path, monkeypatch
):
    from pipeline import nightly

    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(project_copy, "push", "-q", str(origin), "main")
    commit = git(project_copy, "rev-parse", "HEAD").strip()
    archive = preset_archive(project_copy)
    with pytest.raises(SweepError, match=rf"^dataset=dogs_vs_cats: fetch.archive {re.escape(repr(archive))} is a"):
        nightly.check_before_submitting(Point(("dataset=dogs_vs_cats",), "nightly-x"), str(origin), commit)
    nightly.check_before_submitting(Point(("dataset=dogs_vs_cats", "fetch.source=kaggle"), "n"), str(origin), commit)
    nightly.check_before_submitting(Point((), "nightly-x"), str(origin), commit)
    assert list((tmp_path / "runs").iterdir()) == []  # the clones are gone


# --- where a sweep's data stages run ----------------------------------------------------------


class PoolsClient:
    """Just enough of Prefect's client: which pools exist and how many workers poll each."""

    def __init__(self, online: dict[str, int]):
        self.online = online

    def read_work_pool(self, pool):
        from prefect.exceptions import ObjectNotFound

        if pool not in self.online:
            raise ObjectNotFound(http_exc=Exception(pool))

    def read_workers_for_work_pool(self, pool, **kwargs):
        self.read_work_pool(pool)
        return [object()] * self.online[pool]


def test_data_stages_go_to_the_cpu_pool_when_a_worker_polls_it():
    assert sweep.choose_data_pool(PoolsClient({"gpu": 2, "cpu": 1}), None, "gpu") == "cpu"
    assert sweep.choose_data_pool(PoolsClient({"gpu": 2, "cpu": 0}), None, "gpu") == "gpu"  # nobody there
    assert sweep.choose_data_pool(PoolsClient({"gpu": 2}), None, "gpu") == "gpu"  # no such pool
    assert sweep.choose_data_pool(PoolsClient({"gpu": 2, "big-cpu": 0}), "big-cpu", "gpu") == "big-cpu"
    with pytest.raises(SweepError, match="no work pool 'nope'"):
        sweep.choose_data_pool(PoolsClient({"gpu": 2}), "nope", "gpu")


# --- which groups need a data-stage run --------------------------------------------------------


def test_groups_whose_data_already_ran_get_the_published_lock_and_no_new_run():
    a, b, c, d, e = (Point((f"train.learning_rate=0.00{i}",), name) for i, name in enumerate("abcde", 1))
    published = {"ran-before": {"fetch": {"cmd": "x"}}}
    asked: list[str] = []

    def lookup(key):
        asked.append(key)
        return published.get(key, {})

    groups = {"ran-before": [a], "new-pair": [b, c], "new-single": [d], "all-done": [e]}
    locks, shared = sweep.plan_data_runs(groups, done={"e"}, published=lookup)
    assert locks == {"a": published["ran-before"]}  # even a one-point group reuses an earlier run
    assert shared == {"new-pair": [b, c]}  # a new group of two runs its data stages once
    assert "all-done" not in asked  # nothing left to run there: not even looked up
    assert sweep.plan_data_runs({}, set(), lookup) == ({}, {})


def test_the_data_artifact_is_named_by_the_data_key():
    one = sweep.data_artifact(grid.data_key({"split": 1}, ["split"], "source-a"))
    assert one.startswith("data-") and one == sweep.data_artifact(grid.data_key({"split": 1}, ["split"], "source-a"))
    assert one != sweep.data_artifact(grid.data_key({"split": 2}, ["split"], "source-a"))
    assert one != sweep.data_artifact(grid.data_key({"split": 1}, ["split"], "source-b"))
    assert re.fullmatch(r"[a-z0-9-]+", one)  # what Prefect accepts as a key


TOY_STAGES = {
    "stages": {
        "split": {
            "cmd": "python split.py",
            "deps": ["split.py", "data/raw"],
            "params": ["split", {"runtime.yaml": ["split"]}],
            "outs": ["data/split"],
        },
        "train": {"cmd": "python train.py", "deps": ["train.py", "data/split"], "params": ["train"]},
    }
}


def commit_files(work, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (work / name).write_text(text)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", message)
    return git(work, "rev-parse", "HEAD").strip()


def test_commits_whose_data_stages_are_the_same_share_one_data_source(tmp_path):
    """Issue 27 (test time) and everyday sweeps: a commit that changes only training code, or a package
    only training imports, reuses the data-stage run of the commit before (it ran again before)."""
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    runtime = {"python": "3.11", "split": {"numpy": "2.0"}, "train": {"keras": "3.0"}}
    base = {
        "dvc.yaml": yaml.safe_dump(TOY_STAGES),
        "split.py": "split\n",
        "train.py": "train\n",
        "runtime.yaml": yaml.safe_dump(runtime),
    }
    a = commit_files(work, base, "A")
    source = grid.data_source(work, a, ["split"])
    b = commit_files(
        work, {"train.py": "train v2\n", "runtime.yaml": yaml.safe_dump({**runtime, "train": {"keras": "3.1"}})}, "B"
    )
    assert grid.data_source(work, b, ["split"]) == source
    assert grid.data_source(work, a, ["split"]) == source  # read from the commit, not the working tree
    changed = {
        "code": {"split.py": "split v2\n"},
        "package": {"runtime.yaml": yaml.safe_dump({**runtime, "split": {"numpy": "2.1"}})},
        "command": {"dvc.yaml": yaml.safe_dump(TOY_STAGES).replace("python split.py", "python split.py --fast")},
    }
    for what, files in changed.items():
        commit = commit_files(work, files, what)
        assert grid.data_source(work, commit, ["split"]) != source, what
        git(work, "reset", "-q", "--hard", b)


# --- a point is done only when its results are home: outputs first, refs last --------------------

TOY_STAGE = """stages:
  make:
    cmd: mkdir -p out && echo ${x} > out/x && echo done > model.txt
    params: [x]
    outs: [out, model.txt]
"""


def toy_dvc_origin(tmp_path) -> tuple[str, str]:
    """A bare git `origin` holding a one-stage DVC project (two outputs, one a folder); its URL and commit."""
    work, origin = tmp_path / "toy", tmp_path / "toy-origin.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    dvc(work, "init", "-q")
    (work / "dvc.yaml").write_text(TOY_STAGE)
    (work / "params.yaml").write_text("x: 1\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "toy")
    git(work, "push", "-q", str(origin), "main")
    return str(origin), git(work, "rev-parse", "HEAD").strip()


def dvc(project, *args: str) -> str:
    from pipeline.dvc import DVC_COMMAND, dvc_env

    proc = subprocess.run([*DVC_COMMAND, *args], cwd=project, env=dvc_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """One worker machine: its work folder, git mirrors and DVC cache under tmp_path."""
    monkeypatch.setenv(workspace.WORK_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(workspace.GIT_MIRRORS_ENV, str(tmp_path / "mirrors"))
    monkeypatch.setenv(workspace.DVC_CACHE_ENV, str(tmp_path / "dvc-cache"))
    return tmp_path


def remote_exps(origin: str) -> dict[str, str]:
    """name -> commit of every experiment ref in the git remote."""
    return {ref.rsplit("/", 1)[-1]: sha for sha, ref in workspace.ls_remote(origin, "refs/exps/*")}


def test_a_dvc_remote_refusing_the_push_leaves_no_refs_and_keeps_the_clone_saying_where(machine):
    from pipeline import experiment

    origin, commit = toy_dvc_origin(machine)
    (machine / "a-file").write_text("a DVC remote cannot live under a file: every upload fails\n")
    with pytest.raises(workspace.KeepCheckout) as kept:
        with workspace.clean_checkout(origin, commit, "refused") as clone:
            experiment.configure_dvc(clone, str(machine / "a-file" / "remote"))
            dvc(clone, "exp", "run", "-n", "refused")
            experiment.push_home(clone, "refused", origin, {}, print)
    assert remote_exps(origin) == {}  # no refs without their outputs: a rerun does not take it for done
    message = str(kept.value)
    assert "pushing its outputs and run cache to the DVC remote failed" in message
    assert f"kept on {workspace.host()} in {clone}" in message
    assert f"`cd {clone} && dvc push --run-cache && dvc exp push --no-cache origin refused`" in message
    assert (clone / "model.txt").read_text() == "done\n"  # the clone is kept, results and all


def test_refs_on_the_git_remote_without_their_outputs_on_the_dvc_remote_are_not_home(machine):
    from pipeline import experiment, results

    origin, commit = toy_dvc_origin(machine)
    target = results.Target(origin, commit, str(machine / "dvc-remote"), "gpu")
    logs: list[str] = []
    with workspace.clean_checkout(origin, commit, "half") as clone:
        experiment.configure_dvc(clone, target.dvc_remote)
        dvc(clone, "exp", "run", "-n", "half")
        dvc(clone, "exp", "push", "--no-cache", "origin", "half")  # the refs alone, as a refused push left them
        assert sweep.results_home(target, ["half", "never-ran"], logs.append) == (set(), {"half"})
        assert logs == [f"half: in {origin}, but the DVC remote lacks model.txt, out, out/x: it runs again"]
        dvc(clone, "push")
    assert sweep.results_home(target, ["half", "never-ran"], logs.append) == ({"half"}, set())
    assert list((machine / "runs").iterdir()) == []  # the checks' clones are gone


def test_a_diverged_experiment_is_a_failure_and_replace_pushes_over_it(machine):
    from pipeline import experiment

    origin, commit = toy_dvc_origin(machine)
    storage = str(machine / "dvc-remote")
    with workspace.clean_checkout(origin, commit, "first") as clone:
        experiment.configure_dvc(clone, storage)
        dvc(clone, "exp", "run", "-n", "twice")
        experiment.push_home(clone, "twice", origin, {}, print)
    first = remote_exps(origin)["twice"]
    with pytest.raises(workspace.KeepCheckout, match="already holds another experiment named twice") as kept:
        with workspace.clean_checkout(origin, commit, "second") as clone:
            experiment.configure_dvc(clone, storage)
            dvc(clone, "exp", "run", "-n", "twice", "-S", "x=2")
            experiment.push_home(clone, "twice", origin, {}, print)
    assert "(DVC: diverged)" in str(kept.value) and "dvc exp push --no-cache --force origin twice" in str(kept.value)
    assert remote_exps(origin) == {"twice": first}  # the first one's refs, untouched
    experiment.push_home(clone, "twice", origin, {}, print, replace=True)  # as a sweep asks for a point not home
    assert remote_exps(origin)["twice"] != first
    shutil.rmtree(clone)
