"""Stage `preprocess`: decode every image of the manifest once into compact arrays.

Writes, for each subset in (train, val, test):

    data/prepared/<subset>_images.npy   uint8 [n, height, width, channels]
    data/prepared/<subset>_labels.npy   int64 [n] (class ids, see classes.json)

plus classes.json (sorted class names: the id of a class is its position),
report.json (a DVC metric: images kept per subset, files set aside by reason
and by class, conversions made) and rejected.csv (every file set aside, by
this stage or by fetch, with its reason). Images are decoded in worker
processes, one per usable core (CONVNETS_PREPROCESS_WORKERS overrides), a
chunk of files at a time, a bounded number of chunks ahead; each worker writes
the pixels straight to their row of the .npy file (the manifest's order), and
the gaps of bad files are closed at the end: the outputs are byte-identical
whatever the number of workers, and memory does not grow with the data.

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
from convnets.images import BadImage, load_chunk_into, load_image
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

    def decode_into(self, paths: list[str], rows: NpyRows) -> Iterator[tuple[str, ...] | BadImage]:
        """Decode `paths` into `rows` (file i into row i), in order; yield each file's notes, or its BadImage."""
        if self.pool is None:
            for index, path in enumerate(paths):
                try:
                    loaded = load_image(path, *self.args)
                except BadImage as exc:
                    yield exc
                    continue
                rows.put(index, loaded.array)
                yield loaded.notes
            return
        # Small subsets still go to every worker, in chunks of at most CHUNK_FILES.
        size = max(1, min(CHUNK_FILES, -(-len(paths) // (self.workers * CHUNKS_AHEAD))))
        chunks = iter(range(0, len(paths), size))
        pending: deque[Future] = deque()

        def submit(start: int) -> None:
            target = (str(rows.path), rows.offset(start))
            pending.append(self.pool.submit(load_chunk_into, paths[start : start + size], *target, *self.args))

        for start in chunks:
            submit(start)
            if len(pending) >= self.workers * CHUNKS_AHEAD:
                break
        while pending:
            entries = pending.popleft().result()
            start = next(chunks, None)
            if start is not None:
                submit(start)
            for entry in entries:
                yield BadImage(*entry[1:]) if entry[0] == "bad" else entry[1]


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
    with NpyRows(out_dir / images_file(subset), (height, width, params.channels), len(rows)) as images:
        decoded = zip(rows["file"].tolist(), names, decoder.decode_into(files, images), strict=True)
        for index, (file, label, result) in enumerate(progress(decoded, f"preprocess: {subset}", total=len(rows))):
            if isinstance(result, BadImage):
                bad.add(file, label, subset, result)
                images.skip(index)
                continue
            conversions.update(result)
            labels[kept] = class_ids[label]
            kept += 1
    np.save(out_dir / labels_file(subset), labels[:kept])
    return kept


class NpyRows:
    """A uint8 .npy file of `capacity` rows, row i for the manifest's file i; bad files' rows are dropped on close.

    Rows are written in place (os.pwrite), by this process or by the decoding
    workers, in any order. Not a memory map: the pages of a mapped output stay
    in the process's resident memory until it ends (2 GB for 23,000 photos at
    180 px), while written pages go to the page cache, which the kernel flushes
    and frees as it needs. On close the rows after each skipped one move up
    (only when files were bad) and the header is corrected to the rows kept.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], capacity: int):
        self.path, self.row_shape, self.capacity = path, row_shape, capacity
        self.row_bytes = int(np.prod(row_shape))
        self.header = npy_header((capacity, *row_shape))
        self.skipped: list[int] = []
        self.file = open(path, "w+b")  # kept open: the one-process path writes every row through it
        self.file.write(self.header)
        self.file.truncate(self.offset(capacity))

    def offset(self, index: int) -> int:
        """Where row `index` starts in the file."""
        return len(self.header) + index * self.row_bytes

    def put(self, index: int, row: np.ndarray) -> None:
        assert row.shape == self.row_shape and row.dtype == np.uint8
        os.pwrite(self.file.fileno(), np.ascontiguousarray(row).data, self.offset(index))

    def skip(self, index: int) -> None:
        """Row `index` stays empty (a bad file): it is dropped on close."""
        self.skipped.append(index)

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc) -> None:
        rows = self.capacity - len(self.skipped)
        with self.file as file:
            self.close_gaps(file.fileno())
            header = npy_header((rows, *self.row_shape))
            if len(header) == len(self.header):  # the usual case: rewrite the header in place
                os.pwrite(file.fileno(), header, 0)
                file.truncate(self.offset(rows))
                return
        # The padded header changed length: copy the rows behind a new one.
        with atomic_file(self.path) as moved, open(self.path, "rb") as source, open(moved, "wb") as target:
            target.write(header)
            source.seek(len(self.header))
            remaining = rows * self.row_bytes
            while remaining:
                chunk = source.read(min(remaining, 1 << 24))
                target.write(chunk)
                remaining -= len(chunk)

    def close_gaps(self, fd: int) -> None:
        """Move each kept row after the first skipped one up to its place among the kept rows."""
        if not self.skipped:
            return
        skipped = set(self.skipped)
        kept = [i for i in range(min(skipped), self.capacity) if i not in skipped]
        for place, index in enumerate(kept, start=min(skipped)):
            os.pwrite(fd, os.pread(fd, self.row_bytes, self.offset(index)), self.offset(place))


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
