"""Benchmark of the dogs-vs-cats data stages (issue 3): run by hand, prints figures; not a test.

    python benchmarks/bench_data.py [--replica PATH] [--only book-128,all-180]

Runs fetch + split + preprocess (the work functions, without DVC) on the
offline replica for each configuration below, each in a fresh process and a
fresh temporary data folder, and prints per stage wall time plus the peak
memory of that process: peak RSS (ru_maxrss), and, sampled from
/proc/self/status, the peak of anonymous memory (what the stage allocates)
and of file-backed resident pages (the page cache of the files it maps).

    book-128 / book-180   the book's subset: per class indices 0-999 / 1000-1499 /
                          1500-2499 (2,000 + 1,000 + 2,000 photos), at 128 and 180 px
    all-128 / all-180     all 23,000 photos (per class 0-8999 / 9000-9999 / 10000-11499)
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


def child(name: str, replica: Path, workdir: Path) -> dict:
    """One configuration, in this process: the three stages, timed."""
    from convnets.fetch import fetch
    from convnets.params import FetchParams, PreprocessParams, SplitParams
    from convnets.preprocess import preprocess
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
        start = time.perf_counter()
        report = preprocess(manifest, data / "raw", PreprocessParams(image_size=size, channels=3), data / "prepared")
        times["preprocess_s"] = time.perf_counter() - start
    prepared_bytes = sum(p.stat().st_size for p in (data / "prepared").iterdir())
    return {
        "config": name,
        "images": sum(report["kept"].values()),
        **{key: round(value, 2) for key, value in times.items()},
        "total_s": round(sum(times.values()), 2),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_anon_mib": memory.peak["RssAnon"],
        "peak_file_mib": memory.peak["RssFile"],
        "prepared_mib": round(prepared_bytes / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=Path, default=REPLICA)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.replica, args.workdir)))
        return
    if not args.replica.is_file():
        sys.exit(f"replica not found: {args.replica}")
    print(f"replica {args.replica}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    header = (
        f"{'config':9} {'images':>6} {'fetch s':>8} {'split s':>8} {'prep s':>8} {'total s':>8} "
        f"{'RSS MiB':>8} {'anon MiB':>9} {'file MiB':>9} {'npy MiB':>8}"
    )
    print(header)
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-data-{name}-") as workdir:
            result = subprocess.run(
                [sys.executable, __file__, "--child", name, "--replica", str(args.replica), "--workdir", workdir],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
        if result.returncode != 0:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"{r['config']:9} {r['images']:>6} {r['fetch_s']:>8} {r['split_s']:>8} {r['preprocess_s']:>8} "
            f"{r['total_s']:>8} {r['peak_rss_mib']:>8} {r['peak_anon_mib']:>9} "
            f"{r['peak_file_mib']:>9} {r['prepared_mib']:>8}",
            flush=True,
        )


if __name__ == "__main__":
    main()
