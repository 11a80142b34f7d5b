"""Overhead of the Prefect flow over a bare `dvc repro` (issue 5): run by hand, prints figures.

    python benchmarks/bench_flow.py [--repeat N] [--baseline REV] [--with-integration]

Side by side in one run, each in its own fresh copy of the working tree (own DVC cache,
nothing up to date), on the embedded default (params.yaml as it is, MNIST sample):

    dvc repro                             the bare pipeline
    python -m pipeline --no-experiment    the flow on Prefect's ephemeral API, first use of
                                          a PREFECT_HOME (the server creates its database)
    the same, again with that PREFECT_HOME  the usual case (database already there)
    the flow of git revision REV           with --baseline: the same, warm, with the code of
                                          REV (e.g. before a change to the flow), side by side

and, from the flow's log, how much of the overhead is the ephemeral server's start and
how much is ours (the rest). Target: the flow adds under 10 s on a warm PREFECT_HOME.
--with-integration also times the two-clone GPU-pool test (tests/test_flow_gpu_pool.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 10.0
PREFECT_PHASES = ("python + prefect imports", "ephemeral server start", "server stop + exit")
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| ")


def copy_working_tree(dest: Path) -> Path:
    """The repo as a clone would see it (uncommitted edits included), committed in a fresh git repo."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    commit_all(dest)
    return dest


def commit_all(dest: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=dest, check=True, env=env)


def copy_revision(rev: str, dest: Path) -> Path:
    """The repo's files at git revision `rev`, committed in a fresh git repo."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x"], cwd=dest, input=archive, check=True)
    commit_all(dest)
    return dest


def environment(project: Path, prefect_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join([str(project), str(project / "src")]),  # the copy's code
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def timed(args: list[str], project: Path, env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Wall seconds, and the seconds of the day at launch and at exit."""
    launched, start = seconds_of_day(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(args, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {project}; see {log}")
    return seconds, launched, seconds_of_day()


def log_lines(log: Path) -> list[tuple[float, str]]:
    """(seconds of the day, text) of each timestamped line of a Prefect console log."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if stamp := STAMP.match(line):
            moment = datetime.strptime(stamp.group(1), "%H:%M:%S.%f")
            found.append((moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6, line))
    return found


def phases(log: Path, launched: float, ended: float) -> dict[str, float]:
    """Where the flow's time goes, from its log: Prefect's parts and ours.

    launched/ended: seconds of the day when the process started and ended.
    """
    lines = log_lines(log)

    def first(text: str, after: float = 0.0) -> float:
        return next(t for t, line in lines if text in line and t >= after)

    server = first("Starting temporary server")
    flow = first("Beginning flow run")
    order = next(line for _, line in lines if "stages in the order of `dvc dag`:" in line)
    stages = order.split("`dvc dag`: ")[1].split(" -> ")
    gaps, previous = 0.0, None
    for stage in stages:  # from the task before to the stage's first output: DVC's start-up
        start = first(f"Task run '{stage}' - ")
        if previous is not None:
            gaps += start - previous
        previous = first(f"Task run '{stage}' - Finished in state", start)
    flow_done = next(t for t, line in lines if t >= previous and "Flow run" in line and "Finished in state" in line)
    return {
        "python + prefect imports": server - launched,
        "ephemeral server start": flow - server,
        "flow start + dvc dag": first(f"Task run '{stages[0]}' - ") - flow,
        "between stages (dvc start-up, task runs)": gaps,
        "artifacts": flow_done - previous,
        "server stop + exit": ended - flow_done,
    }


def seconds_of_day() -> float:
    now = datetime.now()
    return now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6


def one_round(work: Path, baseline: str | None) -> dict[str, float]:
    home = work / "prefect-home"
    figures = {}
    flow = [sys.executable, "-m", "pipeline", "--no-experiment"]
    runs = [
        ("dvc repro", ["dvc", "repro"], None),
        ("flow, new PREFECT_HOME", flow, None),
        ("flow, warm PREFECT_HOME", flow, None),
    ]
    if baseline:
        runs.append((f"flow of {baseline}, warm", flow, baseline))
    for name, args, rev in runs:
        folder = work / name.replace(" ", "-").replace(",", "")
        project = copy_revision(rev, folder) if rev else copy_working_tree(folder)
        log = work / f"{project.name}.log"
        figures[name], launched, ended = timed(args, project, environment(project, home), log)
        print(f"  {name:<28} {figures[name]:6.1f} s", flush=True)
        if args[0] != "dvc":
            for phase, seconds in phases(log, launched, ended).items():
                figures[f"{name}: {phase}"] = seconds
                print(f"      {phase:<42} {seconds:5.1f} s", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="rounds (default: %(default)s)")
    parser.add_argument("--baseline", metavar="REV", help="also time the flow of this git revision, side by side")
    parser.add_argument("--with-integration", action="store_true", help="also time tests/test_flow_gpu_pool.py")
    args = parser.parse_args()

    rounds = []
    for index in range(args.repeat):
        print(f"round {index + 1} of {args.repeat}", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-flow-") as work:
            rounds.append(one_round(Path(work), args.baseline))

    print("\nbest of the rounds (s):")
    best = {name: min(r[name] for r in rounds) for name in rounds[0]}
    bare = best["dvc repro"]
    print(f"  dvc repro                     {bare:6.1f}")
    cases = ["flow, new PREFECT_HOME", "flow, warm PREFECT_HOME"]
    cases += [f"flow of {args.baseline}, warm"] if args.baseline else []
    for case in cases:
        extra = best[case] - bare
        verdict = "ok" if extra < TARGET_S else f"over the {TARGET_S:.0f} s target"
        prefect = sum(best[f"{case}: {p}"] for p in PREFECT_PHASES)
        print(
            f"  {case:<29} {best[case]:6.1f}  (+{extra:.1f} s, {verdict}; Prefect's imports, "
            f"server start and stop {prefect:.1f} s, ours {extra - prefect:.1f} s)"
        )

    if args.with_integration:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_flow_gpu_pool.py"], cwd=REPO)
        print(
            f"\ntwo-clone GPU-pool integration test: {time.perf_counter() - start:.0f} s wall"
            f" ({'passed' if proc.returncode == 0 else 'FAILED'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
