"""Which locked environment runs this code: the uv.lock it was installed from, and the versions that matter.

Whoever installs an environment from uv.lock (`make install`, or a Prefect worker building a
run's environment) writes the lock's SHA-256 into the environment's folder (`sys.prefix`).
The train stage records it with its device record, so every result names the environment
that made it, and two experiments from different locks look different on the compare page.

No heavy imports: the versions come from the installed packages' metadata.

    python -m convnets.environment stamp uv.lock   # after installing uv.lock into this venv
    python -m convnets.environment show            # what the train stage would record
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

from convnets.outputs import file_digest

STAMP_FILE = "convnets-uv-lock.sha256"  # in the environment's folder, next to pyvenv.cfg
SHORT = 12  # characters of the lock's hash shown in records, reports and logs
UNLOCKED = "unlocked"  # an environment installed some other way (pip install -e .)


def lock_digest(lock_file: Path) -> str:
    """The SHA-256 of a uv.lock's bytes: the environment's identity."""
    return file_digest(lock_file, "sha256").hexdigest()


def write_stamp(prefix: Path, digest: str) -> None:
    (Path(prefix) / STAMP_FILE).write_text(digest + "\n", encoding="utf-8")


def read_stamp(prefix: Path | None = None) -> str | None:
    """The lock hash the environment at `prefix` (default: this interpreter's) was installed from."""
    try:
        text = (Path(prefix or sys.prefix) / STAMP_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, str | None]:
    """The record for devices.json and the report: lock (short hash), Python, TensorFlow, Keras."""
    digest = read_stamp()
    return {
        "lock": digest[:SHORT] if digest else UNLOCKED,
        "python": platform.python_version(),
        "tensorflow": version_of("tensorflow"),
        "keras": version_of("keras"),
    }


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["stamp"] and len(args) == 2:
        write_stamp(Path(sys.prefix), lock_digest(Path(args[1])))
        return 0
    if args == ["show"]:
        print(json.dumps(describe(), indent=2))
        return 0
    print("usage: python -m convnets.environment stamp UV_LOCK | show", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
