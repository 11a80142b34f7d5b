"""Benchmark of the dogs-vs-cats data stages (issue 3): run by hand, prints figures; not a test.

    python benchmarks/bench_data.py [--replica PATH] [--only book-128,all-180]
    python benchmarks/bench_data.py --only all-180 --workers 1,all --repeat 2

Runs fetch + split + preprocess (the work functions, without DVC) on the
offline replica for each configuration below, each in a fresh process and a
fresh temporary data folder, and prints per stage wall time plus the peak
memory of that process: peak RSS (ru_maxrss), and, sampled from
/proc/self/status, the peak of anonymous memory (what the stage allocates)
and of file-backed resident pages (the page cache of the files it maps).

    book-128 / book-180   the book's subset: per class indices 0-999 / 1000-1499 /
                          1500-2499 (2,000 + 1,000 + 2,000 photos), at 128 and 180 px
    all-128 / all-180     all 23,000 photos (per class 0-8999 / 9000-9999 / 10000-11499)

--workers compares preprocess with that many decoding processes ("all": every
usable core), the arms alternating --repeat times (the best run of each counts,
as the machine may be shared); "workers MiB" is the largest peak RSS of one
worker process, so the stage's peak is about RSS + workers x that (less the
pages a forked worker shares with its parent). "prep CPU s" is the CPU time of
preprocess, its workers included: on a busy machine it shows what parallel
decoding costs in all even when the wall time cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
REPLICA = REPO.parent / "shared" / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
BOOK = {"train_range": [0, 1000], "val_range": [1000, 1500], "test_range": [1500, 2500]}
ALL = {"train_range": [0, 9000], "val_range": [9000, 10000], "test_range": [10000, 11500]}
CONFIGS = {
    "book-128": (BOOK, [128, 128]),
    "book-180": (BOOK, [180, 180]),
    "all-128": (ALL, [128, 128]),
    "all-180": (ALL, [180, 180]),
}


class MemorySampler:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms (Linux)."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self):
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)  # kB -> MiB

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the decoding workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(name: str, replica: Path, workdir: Path, workers: int | None = None) -> dict:
    """One configuration, in this process: the three stages, timed."""
    from convnets.fetch import fetch
    from convnets.params import FetchParams, PreprocessParams, SplitParams
    from convnets.preprocess import preprocess, worker_count
    from convnets.split import read_catalog, split

    ranges, size = CONFIGS[name]
    data = workdir / "data"
    times = {}
    with MemorySampler() as memory:
        start = time.perf_counter()
        fetch(FetchParams(source="archive", archive=str(replica), classes=["cat", "dog"]), data / "raw")
        times["fetch_s"] = time.perf_counter() - start
        start = time.perf_counter()
        manifest = split(read_catalog(data / "raw"), SplitParams(method="index_ranges", **ranges), seed=42)
        times["split_s"] = time.perf_counter() - start
        start, cpu = time.perf_counter(), cpu_seconds()
        params = PreprocessParams(image_size=size, channels=3)
        report = preprocess(manifest, data / "raw", params, data / "prepared", workers=workers)
        times["preprocess_s"] = time.perf_counter() - start
        preprocess_cpu_s = cpu_seconds() - cpu
    prepared_bytes = sum(p.stat().st_size for p in (data / "prepared").iterdir())
    return {
        "config": name,
        "workers": workers or worker_count(),
        "images": sum(report["kept"].values()),
        **{key: round(value, 2) for key, value in times.items()},
        "total_s": round(sum(times.values()), 2),
        "preprocess_cpu_s": round(preprocess_cpu_s, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "peak_anon_mib": memory.peak["RssAnon"],
        "peak_file_mib": memory.peak["RssFile"],
        "prepared_mib": round(prepared_bytes / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=Path, default=REPLICA)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--workers", default="", help='decoding processes to compare, e.g. "1,all"')
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration and arm, alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.replica, args.workdir, args.child_workers)))
        return
    if not args.replica.is_file():
        sys.exit(f"replica not found: {args.replica}")
    print(
        f"replica {args.replica.name}, {len(os.sched_getaffinity(0))} usable CPUs ({cpu_model()}), "
        f"Python {sys.version.split()[0]}"
    )
    header = (
        f"{'config':9} {'workers':>7} {'images':>6} {'fetch s':>8} {'split s':>8} {'prep s':>8} {'prep CPU s':>10} "
        f"{'total s':>8} {'RSS MiB':>8} {'workers MiB':>11} {'anon MiB':>9} {'file MiB':>9} {'npy MiB':>8}"
    )
    print(header)
    arms = [None if w == "all" else int(w) for w in args.workers.split(",")] if args.workers else [None]
    for name in args.only.split(","):
        best: dict = {}
        for _ in range(args.repeat):
            for workers in arms:
                r = run_child(name, args.replica, workers)
                print(row(r), flush=True)
                if r["workers"] not in best or r["preprocess_s"] < best[r["workers"]]["preprocess_s"]:
                    best[r["workers"]] = r
        if args.repeat > 1 or len(best) > 1:
            print(f"best of {args.repeat}:")
            for r in best.values():
                print(row(r))
        if len(best) > 1:
            one, most = best[min(best)], best[max(best)]
            print(
                f"{name}: preprocess on {most['workers']} processes {one['preprocess_s'] / most['preprocess_s']:.2f}x "
                f"as fast as on 1 ({one['preprocess_s']} s -> {most['preprocess_s']} s)"
            )


def run_child(name: str, replica: Path, workers: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-data-{name}-") as workdir:
        command = [sys.executable, __file__, "--child", name, "--replica", str(replica), "--workdir", workdir]
        result = subprocess.run(
            command + ([] if workers is None else ["--child-workers", str(workers)]),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    return (
        f"{r['config']:9} {r['workers']:>7} {r['images']:>6} {r['fetch_s']:>8} {r['split_s']:>8} "
        f"{r['preprocess_s']:>8} {r['preprocess_cpu_s']:>10} {r['total_s']:>8} {r['peak_rss_mib']:>8} "
        f"{r['worker_rss_mib']:>11} {r['peak_anon_mib']:>9} {r['peak_file_mib']:>9} {r['prepared_mib']:>8}"
    )


if __name__ == "__main__":
    main()
