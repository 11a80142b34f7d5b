"""Benchmark of the locked environment (issue 17): run by hand, prints figures; not a test.

    python benchmarks/bench_install.py [--baseline REV] [--skip-run] [--worker-only] [--keep]

In one run, side by side, each in a fresh `git clone`:
1. `make install`, then `make run` (the pipeline on the MNIST sample), before (REV, pip)
   and after (HEAD, uv.lock with uv), each with an empty package cache (a new temporary
   one) and with the cache this machine has warm;
2. a worker's run environment (pipeline.environments) for HEAD's uv.lock: the first run
   at that lock (built, from uv's warm cache and from an empty one) against a second run
   at the same lock (reused), and what a stage's imports then cost in it: the first process
   to import them, and the next (issue 27: bytecode is written on first import, not at build),
   with PYTHONDONTWRITEBYTECODE set in the worker, as in CI and containers; side by side,
   with the `.pyc` of the packages the worker's own environment shares linked in at build
   (as runs do) and without (each module compiled by the first process that imports it).
Prints the CPU model, since the figures depend on it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
BASELINE = "74f89e8"  # the last commit that installed with pip (issue 17)
# What the stages' processes import, in the pipeline's order: the run's DVC, the data and report stages'
# libraries, then the train stage's (the project's own modules are left out: they are small).
STAGE_IMPORTS = {
    "dvc (a run's `dvc exp run`)": (
        "import dvc.cli, dvc.repo.experiments.run, dvc.repo.reproduce, dvc_data.index, hydra"
    ),
    "fetch to report (pandas, PIL, mpl, sklearn)": (
        "import pandas, PIL.Image, numpy, matplotlib.pyplot, sklearn.metrics"
    ),
    "train, evaluate (tensorflow, keras, dvclive)": "import tensorflow, keras, dvclive",
}


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def children_cpu() -> float:
    """CPU seconds of the finished child processes (and theirs): wall time alone depends on the
    machine's other work, which on a shared machine varies from one run to the next."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_cpu(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    cpu = children_cpu()
    return timed(cmd, cwd, env), children_cpu() - cpu


def clone_at(rev: str, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=dest, check=True)
    return dest


def install_and_run(rev: str, cache_env: dict[str, str], work: Path, skip_run: bool) -> tuple[float, float | None]:
    clone = clone_at(rev, Path(tempfile.mkdtemp(dir=work)))
    env = {**os.environ, **cache_env}
    env.pop("VIRTUAL_ENV", None)
    install = timed(["make", "install"], clone, env)
    run = None if skip_run else timed(["make", "run"], clone, env)
    shutil.rmtree(clone, ignore_errors=True)
    return install, run


def worker_environment(
    work: Path, uv_cache: str | None, imports: bool = False, link: bool = True
) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of the first run at HEAD's lock, then of a second run, in a fresh envs folder.

    With `imports`, also prints what the stages' imports cost in the new environment. Without
    `link`, the build links no `.pyc` from this interpreter's environment (the baseline).
    """
    sys.path[:0] = [str(REPO), str(REPO / "src")]
    from pipeline import environments

    linking = environments.link_bytecode
    if not link:
        environments.link_bytecode = lambda target, donor: 0

    os.environ[environments.ENVS_DIR_ENV] = tempfile.mkdtemp(dir=work)
    if uv_cache is not None:
        os.environ["UV_CACHE_DIR"] = uv_cache
    times = []
    try:
        for _ in range(2):
            cpu = children_cpu()
            with environments.environment_for(REPO, extras=()) as env:
                times.append((env.seconds, children_cpu() - cpu))
                if imports and len(times) == 1:
                    print_import_times(env)
    finally:
        os.environ.pop("UV_CACHE_DIR", None)
        environments.link_bytecode = linking
    return times


def print_import_times(env) -> None:
    """Each stage's imports in a fresh process of the run's environment: first, then again."""
    variables = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env.variables(REPO)}
    variables.pop("UV_CACHE_DIR", None)
    for label, statement in STAGE_IMPORTS.items():
        first, again = (timed_cpu([str(env.python), "-c", statement], REPO, variables) for _ in range(2))
        print(f"  {label:44}: first process {seconds(first)}, the next {seconds(again)}", flush=True)


def seconds(timing: tuple[float, float]) -> str:
    return f"{timing[0]:5.1f} s (CPU {timing[1]:5.1f} s)"


def print_worker_figures(work: Path, empty_cache: bool) -> None:
    if empty_cache:
        empty_first, _ = worker_environment(work, str(work / "uv-cache-worker"))
    print(f"worker run environment (HEAD's uv.lock, 237 packages), a stage's imports in it; load {load()}:")
    print(" without the worker's .pyc linked in (compiled on first import):")
    unlinked, _ = worker_environment(work, None, imports=True, link=False)
    print(f" with the .pyc of the packages the worker's own environment ({sys.prefix}) shares linked in:")
    first, second = worker_environment(work, None, imports=True)
    if empty_cache:
        print(f"  first run at a new lock, empty uv cache: {seconds(empty_first)}")
    print(f"  first run at a new lock, warm uv cache : {seconds(first)} ({seconds(unlinked)} without linking)")
    print(f"  second run at the same lock (reused)   : {seconds(second)}")
    print(f"  load average at the end: {load()}")


def load() -> str:
    """The machine's 1-minute load average: above its core count, the wall times above are stretched."""
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit that installed with pip")
    parser.add_argument("--skip-run", action="store_true", help="time `make install` only")
    parser.add_argument("--worker-only", action="store_true", help="the worker's run environment only, warm cache")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-install-"))
    print(f"CPU: {cpu_model()}")
    try:
        if args.worker_only:
            print_worker_figures(work, empty_cache=False)
            return
        cases = [
            ("before: pip", args.baseline, "empty", {"PIP_CACHE_DIR": str(work / "pip-cache")}),
            ("before: pip", args.baseline, "warm", {}),
            ("after: uv.lock", "HEAD", "empty", {"UV_CACHE_DIR": str(work / "uv-cache")}),
            ("after: uv.lock", "HEAD", "warm", {}),
        ]
        print(f"{'fresh clone':16} {'cache':6} {'make install':>13} {'make run after it':>18}")
        for label, rev, cache, env in cases:
            install, run = install_and_run(rev, env, work, args.skip_run)
            run_text = "-" if run is None else f"{run:.1f} s"
            print(f"{label:16} {cache:6} {install:11.1f} s {run_text:>18}", flush=True)
        print_worker_figures(work, empty_cache=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
