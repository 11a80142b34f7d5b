"""What a sweep costs and saves (issue 10): run by hand, prints figures.

    python benchmarks/bench_sweep.py [--epochs N]

On one machine, side by side in one run, with the fleet of tests/test_sweep_fleet.py (a
Prefect server on loopback, a bare git repository as origin, a local DVC remote, two
process workers on pool `gpu`, one on `cpu`), tiny MNIST params:

1. per-experiment overhead: a one-point sweep against a bare `dvc exp run` of the same
   experiment in the submitter's clone, both with the data stages already in the run cache;
2. four experiments: a sweep on the two workers against four `dvc exp run` one after
   the other in the submitter's clone;
3. a new commit on main picked up by a manual nightly run: from `prefect deployment run`
   to the start of its experiment's flow run, and to its end.

Targets: overhead under 20 s per experiment. Machines are shared and noisy: the CPU model
is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from prefect_fleet import run  # noqa: E402
from test_sweep_fleet import TINY, Fleet  # noqa: E402

from conftest import git  # noqa: E402

OVERHEAD_TARGET_S = 20.0


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    run(args, cwd, env, timeout=3600)
    return time.perf_counter() - started


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def sweep_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "sweep", *TINY, *extra, "--timeout", "120"]


def exp_run_args(*overrides: str) -> list[str]:
    return ["dvc", "exp", "run", *TINY, *(x for o in overrides for x in ("-S", o))]


def nightly_pickup(fleet: Fleet, epochs: int) -> tuple[float, float]:
    (fleet.submitter / "NOTES.md").write_text(f"benchmark commit {time.time()}\n")
    git(fleet.submitter, "add", "NOTES.md")
    git(fleet.submitter, "commit", "-q", "-m", "benchmark: a new commit on main")
    git(fleet.submitter, "push", "-q", "origin", "HEAD:main")
    commit = git(fleet.submitter, "rev-parse", "HEAD").strip()
    run(["prefect", "--no-prompt", "deploy", "--name", "nightly"], fleet.submitter, fleet.env)
    overrides = [o for o in TINY if o != "-S"] + [f"train.epochs={epochs}"]
    triggered = time.time()
    run(
        [
            "prefect",
            "deployment",
            "run",
            "dvc-nightly/nightly",
            "--param",
            f"repository={fleet.origin}",
            "--param",
            f"dvc_remote={fleet.dvc_remote}",
            "--param",
            "overrides=" + json.dumps(overrides),
            "--watch",
        ],
        fleet.submitter,
        fleet.env,
        timeout=3600,
    )
    (experiment,) = [r for r in fleet.flow_runs("dvc-experiment") if r["name"] == f"nightly-{commit[:7]}"]
    return experiment["start"] - triggered, experiment["end"] - triggered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per experiment (default: %(default)s)")
    args = parser.parse_args()
    epochs = f"train.epochs={args.epochs}"

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        fleet = Fleet(Path(folder))
        try:
            fleet.start()
            # warm-up: the data stages once, into the run cache and into the submitter's workspace
            run(sweep_args("-S", epochs, "--name-prefix", "warmup"), fleet.submitter, fleet.env, timeout=3600)
            run(exp_run_args(epochs, "train.learning_rate=0.0001"), fleet.submitter, fleet.env, timeout=3600)

            bare = timed(exp_run_args(epochs, "train.learning_rate=0.0005"), fleet.submitter, fleet.env)
            swept = timed(
                sweep_args("-S", epochs, "-S", "train.learning_rate=0.0005", "--name-prefix", "one"),
                fleet.submitter,
                fleet.env,
            )
            rates = [f"train.learning_rate=0.00{i}" for i in (1, 2, 3, 4)]
            sequential = sum(timed(exp_run_args(epochs, rate), fleet.submitter, fleet.env) for rate in rates)
            fanned = timed(
                sweep_args("-S", epochs, "-S", "train.learning_rate=0.001,0.002,0.003,0.004", "--name-prefix", "four"),
                fleet.submitter,
                fleet.env,
            )
            picked_up, finished = nightly_pickup(fleet, args.epochs)
        finally:
            fleet.processes.stop()

    print(f"CPU: {cpu_model()}, tiny MNIST (300/100/100 images), {args.epochs} epochs per experiment")
    print(f"{'':44s} {'seconds':>8s}")
    print(f"{'bare dvc exp run, one experiment':44s} {bare:8.1f}")
    print(f"{'sweep of that one experiment':44s} {swept:8.1f}")
    verdict = "met" if swept - bare < OVERHEAD_TARGET_S else "missed"
    print(f"{'  overhead per experiment':44s} {swept - bare:8.1f}  (target < {OVERHEAD_TARGET_S:.0f} s: {verdict})")
    print(f"{'4 x dvc exp run, one after the other':44s} {sequential:8.1f}")
    print(f"{'sweep of the 4 on 2 workers':44s} {fanned:8.1f}  ({sequential / fanned:.2f}x)")
    print(f"{'nightly: trigger -> experiment starts':44s} {picked_up:8.1f}")
    print(f"{'nightly: trigger -> experiment pushed home':44s} {finished:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
