"""Stage `preprocess`: decode every image of the manifest once into compact arrays.

Writes, for each subset in (train, val, test):

    data/prepared/<subset>_images.npy   uint8 [n, height, width, channels]
    data/prepared/<subset>_labels.npy   int64 [n] (class ids, see classes.json)

plus classes.json (sorted class names: the id of a class is its position),
report.json (a DVC metric: images kept per subset, files set aside by reason
and by class, conversions made) and rejected.csv (every file set aside, by
this stage or by fetch, with its reason). Images are decoded in worker
processes, one per usable core (CONVNETS_PREPROCESS_WORKERS overrides), a
chunk of files at a time, and appended to the .npy files in the manifest's
order as they come back, a bounded number of chunks ahead: the outputs are
byte-identical whatever the number of workers, and memory does not grow with
the data.

Bad files never stop the stage; but when more than preprocess.max_bad_fraction
of a class is bad it fails, rather than train on what is left of the class.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from convnets.cli import stage_main
from convnets.errors import DataError
from convnets.images import BadImage, LoadedImage, load_chunk, load_image
from convnets.layout import CLASSES, MANIFEST, REJECTED, REPORT, SET_ASIDE, SUBSETS, images_file, labels_file
from convnets.outputs import atomic_file, staged_dir, write_json
from convnets.params import Params, PreprocessParams
from convnets.progress import progress

REJECTED_COLUMNS = ["file", "label", "split", "stage", "reason", "detail"]
WORKERS_VARIABLE = "CONVNETS_PREPROCESS_WORKERS"
CHUNK_FILES = 64  # files per task sent to a worker: large enough to amortise the round trip
CHUNKS_AHEAD = 3  # chunks in flight per worker: bounds the decoded images waiting to be written


def worker_count() -> int:
    """Processes that decode: every usable core, or CONVNETS_PREPROCESS_WORKERS."""
    value = os.environ.get(WORKERS_VARIABLE, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise DataError(f"{WORKERS_VARIABLE}={value!r}: expected a whole number of processes, 1 or more")
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_method() -> multiprocessing.context.BaseContext:
    """fork where there is one (Linux): a worker starts at once, with the modules loaded.

    spawn would start each worker by importing this stage's module (pandas,
    pydantic: 1.5 s) before it decodes anything, as long as the whole of
    preprocess on MNIST. The workers only decode with Pillow: none of the
    locks a fork can copy while another thread holds them is theirs to take.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if sys.platform == "linux" and "fork" in methods else "spawn")


class Decoder:
    """Decodes lists of files in order, in this process (1 worker) or in a pool of worker processes."""

    def __init__(self, params: PreprocessParams, workers: int):
        self.args = (tuple(params.image_size), params.channels, params.max_pixels)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=start_method())

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:  # on an error, drop the chunks not started yet
            self.pool.shutdown(wait=True, cancel_futures=True)

    def decode(self, paths: list[str]) -> Iterator[LoadedImage | BadImage]:
        """One result per path, in the order of `paths`; a bad file gives its BadImage."""
        if self.pool is None:
            for path in paths:
                try:
                    yield load_image(path, *self.args)
                except BadImage as exc:
                    yield exc
            return
        # Small subsets still go to every worker, in chunks of at most CHUNK_FILES.
        size = max(1, min(CHUNK_FILES, -(-len(paths) // (self.workers * CHUNKS_AHEAD))))
        chunks = iter([paths[i : i + size] for i in range(0, len(paths), size)])
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(self.pool.submit(load_chunk, chunk, *self.args))
            if len(pending) >= self.workers * CHUNKS_AHEAD:
                break
        while pending:
            results = pending.popleft().result()
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(self.pool.submit(load_chunk, chunk, *self.args))
            yield from self._results(results)

    def _results(self, chunk: tuple[bytes, list[tuple]]) -> Iterator[LoadedImage | BadImage]:
        pixels, entries = chunk
        shape = (*self.args[0], self.args[1])
        row_bytes, offset = int(np.prod(shape)), 0
        for entry in entries:
            if entry[0] == "bad":
                yield BadImage(*entry[1:])
                continue
            yield LoadedImage(np.frombuffer(pixels, np.uint8, row_bytes, offset).reshape(shape), entry[1])
            offset += row_bytes


class BadFiles:
    """Files set aside so far, and the check that no class loses too many of its images."""

    def __init__(self, manifest: pd.DataFrame, max_fraction: float):
        self.totals = manifest.groupby("label").size().to_dict()
        self.max_fraction = max_fraction
        self.per_class: Counter[str] = Counter()
        self.rows: list[dict] = []

    def add(self, file: str, label: str, subset: str, error: BadImage) -> None:
        self.rows.append(
            {
                "file": file,
                "label": label,
                "split": subset,
                "stage": "preprocess",
                "reason": error.reason,
                "detail": error.detail,
            }
        )
        self.per_class[label] += 1
        if self.per_class[label] > self.max_fraction * self.totals[label]:
            raise DataError(self.too_many(label))

    def too_many(self, label: str) -> str:
        rows = [row for row in self.rows if row["label"] == label]
        reasons = Counter(row["reason"] for row in rows)
        listed = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        return (
            f"{len(rows)} of the {self.totals[label]} {label!r} images are bad already, more than "
            f"preprocess.max_bad_fraction ({self.max_fraction:g}) of the class ({listed}; first: {rows[0]['file']}): "
            "repair or remove them at the source, or raise preprocess.max_bad_fraction"
        )


def preprocess(
    manifest: pd.DataFrame,
    raw_dir: str | Path,
    params: PreprocessParams,
    out_dir: str | Path,
    workers: int | None = None,
) -> dict:
    """Decode the manifest's images into `out_dir` with `workers` processes (default: worker_count()).

    Return the report.
    """
    raw_dir = Path(raw_dir)
    classes = sorted(manifest["label"].unique())
    class_ids = {name: i for i, name in enumerate(classes)}
    bad = BadFiles(manifest, params.max_bad_fraction)
    conversions: Counter[str] = Counter()
    kept: dict[str, int] = {}
    with staged_dir(out_dir) as tmp, Decoder(params, workers or worker_count()) as decoder:
        for subset in SUBSETS:
            rows = manifest[manifest["split"] == subset]
            kept[subset] = write_subset(rows, raw_dir, params, class_ids, tmp, subset, bad, conversions, decoder)
        rejected = pd.concat(
            [read_set_aside(raw_dir), pd.DataFrame(bad.rows, columns=REJECTED_COLUMNS)], ignore_index=True
        )
        report = build_report(kept, rejected, conversions, params)
        (tmp / CLASSES).write_text(json.dumps(classes) + "\n")
        rejected.to_csv(tmp / REJECTED, index=False)
        write_json(tmp / REPORT, report)
    return report


def build_report(kept: dict[str, int], rejected: pd.DataFrame, conversions: Counter, params: PreprocessParams) -> dict:
    return {
        "kept": kept,
        "rejected": len(rejected),
        "rejected_by_reason": counts(rejected["reason"]),
        "rejected_by_class": counts(rejected["label"][rejected["label"] != ""]),
        "converted": dict(sorted(conversions.items())),  # kept, after these conversions
        "image_size": list(params.image_size),
        "channels": params.channels,
    }


def counts(column: pd.Series) -> dict[str, int]:
    return {str(key): int(n) for key, n in column.value_counts().sort_index().items()}


def read_set_aside(raw_dir: Path) -> pd.DataFrame:
    """What fetch refused (unsafe paths, Thumbs.db, ...), in the rejected.csv columns."""
    path = raw_dir / SET_ASIDE
    if not path.exists():  # fetched before set_aside.csv existed, or a hand-made raw folder
        return pd.DataFrame(columns=REJECTED_COLUMNS)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table.assign(split="", stage="fetch").reindex(columns=REJECTED_COLUMNS)


def write_subset(
    rows, raw_dir, params, class_ids, out_dir, subset, bad: BadFiles, conversions: Counter, decoder: Decoder
) -> int:
    """Stream one subset into <subset>_images.npy / _labels.npy; return how many images were kept."""
    height, width = params.image_size
    labels = np.empty(len(rows), dtype=np.int64)
    kept = 0
    files, names = [str(raw_dir / file) for file in rows["file"]], rows["label"].tolist()
    decoded = zip(rows["file"].tolist(), names, decoder.decode(files), strict=True)
    with NpyAppender(out_dir / images_file(subset), (height, width, params.channels), len(rows)) as images:
        for file, label, loaded in progress(decoded, f"preprocess: {subset}", total=len(rows)):
            if isinstance(loaded, BadImage):
                bad.add(file, label, subset, loaded)
                continue
            images.append(loaded.array)
            conversions.update(loaded.notes)
            labels[kept] = class_ids[label]
            kept += 1
    np.save(out_dir / labels_file(subset), labels[:kept])
    return kept


class NpyAppender:
    """Write a uint8 .npy file one row at a time, with plain sequential writes.

    Not a memory map: the pages of a mapped output stay in the process's
    resident memory until it ends (2 GB for 23,000 photos at 180 px), while
    written pages go to the page cache, which the kernel flushes and frees as
    it needs. The header first claims `capacity` rows and is corrected on close
    to the rows written (bad files are skipped).
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], capacity: int):
        self.path, self.row_shape, self.rows = path, row_shape, 0
        self.row_bytes = int(np.prod(row_shape))
        self.file = open(path, "wb")
        self.header = npy_header((capacity, *row_shape))
        self.file.write(self.header)

    def append(self, row: np.ndarray) -> None:
        assert row.shape == self.row_shape and row.dtype == np.uint8
        self.file.write(np.ascontiguousarray(row).data)  # no copy when the row is contiguous already
        self.rows += 1

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, *exc) -> None:
        header = npy_header((self.rows, *self.row_shape))
        data_end = len(header) + self.rows * self.row_bytes
        if len(header) == len(self.header):  # the usual case: rewrite the header in place
            self.file.seek(0)
            self.file.write(header)
            self.file.truncate(data_end)
            self.file.close()
            return
        self.file.close()  # the padded header changed length: copy the rows behind a new one
        with atomic_file(self.path) as moved, open(self.path, "rb") as source, open(moved, "wb") as target:
            target.write(header)
            source.seek(len(self.header))
            remaining = self.rows * self.row_bytes
            while remaining:
                chunk = source.read(min(remaining, 1 << 24))
                target.write(chunk)
                remaining -= len(chunk)


def npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def read_manifest(split_dir: str | Path) -> pd.DataFrame:
    path = Path(split_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path} not found: run the split stage first (dvc repro split)")
    return pd.read_csv(path, dtype={"file": str, "label": str, "split": str}, keep_default_na=False)


def _run(params: Params, args: argparse.Namespace) -> None:
    manifest = read_manifest(args.split_dir)
    report = preprocess(manifest, args.raw_dir, params.preprocess, args.out_dir)
    reasons = ", ".join(f"{reason} {n}" for reason, n in report["rejected_by_reason"].items())
    print(
        f"preprocess: kept {report['kept']}, set aside {report['rejected']}"
        + (f" ({reasons}; see {REJECTED})" if reasons else "")
        + f" -> {args.out_dir}"
    )


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [
            ("raw_dir", "fetched images (data/raw)"),
            ("split_dir", "split manifest (data/split)"),
            ("out_dir", "output folder (data/prepared)"),
        ],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
