"""What a sweep costs and saves (issues 10 and 18): run by hand, prints figures.

    python benchmarks/bench_sweep.py [--epochs N] [--parts overhead,fanout,nightly] [--datasets mnist,dogs]

On one machine, side by side in one run, with the fleet of tests/test_sweep_fleet.py (a
Prefect server on loopback, a bare git repository as origin, a local DVC remote, two
process workers on pool `gpu`, one on `cpu`):

1. overhead (per data set): the same experiment three ways, each with the data stages
   already in the run cache: a bare `dvc exp run` in the submitter's clone, DVC's own queue
   (`dvc exp run --queue` + `dvc exp run --run-all -j 1`), and a one-point sweep. Prints each
   one's overhead over the bare run, the sweep's overhead against the queue's, and the disk
   the worker's user cache (DVC cache, clones, environments) takes after the three
   experiments it ran. Data sets: the MNIST default (tiny split), and the dogs-vs-cats
   replica in ../shared at 128 px (`+experiment=scratch`);
2. fanout: four experiments, a sweep on the two workers against four `dvc exp run` one
   after the other in the submitter's clone (tiny MNIST);
3. nightly: a new commit on main picked up by a manual nightly run: from `prefect
   deployment run` to the start of its experiment's flow run, and to its end.

Targets (issue 18): a sweep point's overhead at most 1.5x the queue's, and at most 20 s on
the MNIST default. Machines are shared and noisy: the CPU model is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from prefect_fleet import migrated_database, run  # noqa: E402
from test_sweep_fleet import TINY, Fleet  # noqa: E402

from conftest import git  # noqa: E402
from pipeline import nightly  # noqa: E402

OVERHEAD_TARGET_S = 20.0
QUEUE_RATIO_TARGET = 1.5
REPLICA = REPO.parent / "shared" / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
DATASETS = {
    "mnist": ["train.epochs={epochs}"],  # with the tiny split of TINY
    "dogs": [
        "+experiment=scratch",
        "preprocess.image_size=[128,128]",
        f"fetch.archive={REPLICA}",
        "train.epochs={epochs}",
    ],
}


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    run(args, cwd, env, timeout=3600)
    return time.perf_counter() - started


def sweep_args(*extra: str, tiny: bool = True) -> list[str]:
    return [sys.executable, "-m", "pipeline", "sweep", *(TINY if tiny else []), *extra, "--timeout", "120"]


def exp_run_args(*overrides: str, tiny: bool = True, queue: bool = False) -> list[str]:
    flags = [x for o in overrides for x in ("-S", o)]
    return ["dvc", "exp", "run", *(["--queue"] if queue else []), *(TINY if tiny else []), *flags]


def set_flags(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("-S", o)]


def disk_use(folder: Path) -> int:
    """Bytes under `folder`, each inode counted once (hard links into uv's or DVC's cache are free)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def overhead(fleet: Fleet, dataset: str, epochs: int) -> dict[str, float]:
    """Bare run, DVC queue and one-point sweep of the same experiment (three learning rates)."""
    tiny = dataset == "mnist"
    base = [o.format(epochs=epochs) for o in DATASETS[dataset]]
    # warm-up: the data stages into the run cache (on a worker) and into the submitter's workspace;
    # two points, so that both `gpu` workers build the commit's environment before anything is timed
    run(
        sweep_args(
            *set_flags([*base, "train.learning_rate=0.0001,0.00011"]), "--name-prefix", f"warm-{dataset}", tiny=tiny
        ),
        fleet.submitter,
        fleet.env,
        timeout=3600,
    )
    run(exp_run_args(*base, "train.learning_rate=0.0002", tiny=tiny), fleet.submitter, fleet.env, timeout=3600)
    bare = timed(exp_run_args(*base, "train.learning_rate=0.0003", tiny=tiny), fleet.submitter, fleet.env)
    queued = timed(exp_run_args(*base, "train.learning_rate=0.0004", tiny=tiny, queue=True), fleet.submitter, fleet.env)
    queued += timed(["dvc", "exp", "run", "--run-all", "-j", "1"], fleet.submitter, fleet.env)
    swept = timed(
        sweep_args(*set_flags([*base, "train.learning_rate=0.0005"]), "--name-prefix", f"one-{dataset}", tiny=tiny),
        fleet.submitter,
        fleet.env,
    )
    caches = [fleet.root / f"{name}-cache" for name in ("w1", "w2", "nightly")]
    return {"bare": bare, "queue": queued, "sweep": swept, "disk": sum(disk_use(c) for c in caches if c.exists())}


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
    name = nightly.experiment_name(commit, overrides)  # a nightly with overrides has a name of its own
    (experiment,) = [r for r in fleet.flow_runs("dvc-experiment") if r["name"] == name]
    return experiment["start"] - triggered, experiment["end"] - triggered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per experiment (default: %(default)s)")
    parser.add_argument("--parts", default="overhead,fanout,nightly", help="which parts (default: %(default)s)")
    parser.add_argument("--datasets", default="mnist,dogs", help="for the overhead part (default: %(default)s)")
    args = parser.parse_args()
    parts, datasets = args.parts.split(","), args.datasets.split(",")
    if "dogs" in datasets and not REPLICA.is_file():
        sys.exit(f"the dogs-vs-cats replica is not at {REPLICA}: --datasets mnist")
    epochs = f"train.epochs={args.epochs}"
    figures: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        fleet = Fleet(Path(folder), migrated_database(Path(folder) / "prefect-database"))
        try:
            fleet.start()
            if "overhead" in parts:
                for dataset in datasets:
                    figures[dataset] = overhead(fleet, dataset, args.epochs)
            if "fanout" in parts:
                rates = [f"train.learning_rate=0.00{i}" for i in (1, 2, 3, 4)]
                sequential = sum(timed(exp_run_args(epochs, rate), fleet.submitter, fleet.env) for rate in rates)
                grid = "train.learning_rate=0.001,0.002,0.003,0.004"
                fanned = timed(
                    sweep_args("-S", epochs, "-S", grid, "--name-prefix", "four"), fleet.submitter, fleet.env
                )
            if "nightly" in parts:
                picked_up, finished = nightly_pickup(fleet, args.epochs)
        finally:
            fleet.processes.stop()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.epochs} epoch(s) per experiment")
    for dataset, f in figures.items():
        queue_cost, sweep_cost = f["queue"] - f["bare"], f["sweep"] - f["bare"]
        print(f"{dataset}: {'tiny MNIST (300/100/100)' if dataset == 'mnist' else 'dogs-vs-cats replica, 128 px'}")
        print(f"  {'bare dvc exp run':40s} {f['bare']:8.1f} s")
        print(f"  {'DVC queue (--queue, --run-all -j 1)':40s} {f['queue']:8.1f} s  overhead {queue_cost:6.1f} s")
        print(f"  {'one-point sweep':40s} {f['sweep']:8.1f} s  overhead {sweep_cost:6.1f} s")
        ratio = sweep_cost / queue_cost if queue_cost > 0 else float("inf")
        print(f"  {'sweep overhead / queue overhead':40s} {ratio:8.2f}   (target <= {QUEUE_RATIO_TARGET})")
        print(f"  {'workers user caches after the runs':40s} {f['disk'] / 2**20:8.0f} MiB (each file once)")
    if "fanout" in parts:
        print(f"{'4 x dvc exp run, one after the other':42s} {sequential:8.1f} s")
        print(f"{'sweep of the 4 on 2 workers':42s} {fanned:8.1f} s  ({sequential / fanned:.2f}x)")
    if "nightly" in parts:
        print(f"{'nightly: trigger -> experiment starts':42s} {picked_up:8.1f} s")
        print(f"{'nightly: trigger -> experiment pushed home':42s} {finished:8.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
