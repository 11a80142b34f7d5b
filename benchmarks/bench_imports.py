"""What each stage loads: its project modules (read statically) and the time to import it.

    python benchmarks/bench_imports.py [--repeat 5]

For every stage of dvc.yaml: the project modules the stage's module imports,
directly or through other project modules (tests/test_dvc_deps.py checks the
same closure against the stage's deps), whether TensorFlow is among the
modules Python loads, and the fastest of `--repeat` imports in a fresh
interpreter. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from convnets.codedeps import import_closure, stage_modules  # noqa: E402

PROBE = (
    "import sys, time; t = time.perf_counter(); import convnets.{name}; "
    "print(time.perf_counter() - t, 'tensorflow' in sys.modules)"
)


def import_time(name: str, repeat: int) -> tuple[float, bool]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(name=name)],
            cwd=REPO,
            env={"PYTHONPATH": "src", "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        runs.append((float(out[0]), out[1] == "True"))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="imports per stage; the fastest counts")
    args = parser.parse_args()
    print("| stage | project modules | TensorFlow | import (s) |")
    print("|---|---|---|---|")
    for stage, module in stage_modules(REPO / "dvc.yaml").items():
        closure = import_closure(module, REPO / "src")
        seconds, tf = import_time(module.removeprefix("convnets."), args.repeat)
        print(f"| {stage} | {len(closure)} | {'yes' if tf else 'no'} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
