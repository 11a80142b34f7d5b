"""Benchmark of the foundation (issue 2): run by hand, prints figures; not a test.

    python benchmarks/bench_pipeline.py [--keep]

1. `git clone` of this repo's HEAD into a temporary folder, then `make run` there
   (venv creation, install with pip's cache as it is, `dvc repro` on the MNIST sample);
2. a second `dvc repro` with nothing changed (DVC only checks hashes);
3. the test accuracy that `dvc repro` produced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    clone = workdir / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        make_run = timed(["make", "run"], clone)
        env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        noop = timed(["dvc", "repro"], clone, env)
        metrics = json.loads((clone / "data" / "eval" / "metrics.json").read_text())["test"]
        print(f"make run from a fresh clone : {make_run:7.1f} s  (target < 300 s)")
        print(f"second dvc repro (no change): {noop:7.1f} s  (target < 3 s)")
        print(f"test accuracy (MNIST sample): {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}")
        print(f"cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep:
            print(f"clone kept in {clone}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
