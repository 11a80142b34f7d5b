"""Stage `preprocess`: decode every image of the manifest once into compact arrays.

Writes, for each subset in (train, val, test):

    data/prepared/<subset>_images.npy   uint8 [n, height, width, channels]
    data/prepared/<subset>_labels.npy   int64 [n] (class ids, see classes.json)

plus classes.json, report.json (kept / set-aside counts; a DVC metric) and
rejected.csv (each file set aside, with the reason). Images are streamed into
memory-mapped .npy files one at a time, so memory does not grow with the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from convnets.cli import stage_main
from convnets.errors import DataError
from convnets.images import BadImage, decode_image
from convnets.outputs import staged_dir, write_json
from convnets.params import Params, PreprocessParams
from convnets.progress import progress
from convnets.split import MANIFEST, SUBSETS

CLASSES = "classes.json"
REPORT = "report.json"
REJECTED = "rejected.csv"


def preprocess(manifest: pd.DataFrame, raw_dir: str | Path, params: PreprocessParams, out_dir: str | Path) -> dict:
    """Decode the manifest's images into `out_dir`; return the report."""
    raw_dir = Path(raw_dir)
    classes = sorted(manifest["label"].unique())
    class_ids = {name: i for i, name in enumerate(classes)}
    rejected: list[dict] = []
    kept: dict[str, int] = {}
    with staged_dir(out_dir) as tmp:
        for subset in SUBSETS:
            rows = manifest[manifest["split"] == subset]
            kept[subset], bad = write_subset(rows, raw_dir, params, class_ids, tmp, subset)
            rejected.extend(bad)
        report = {
            "kept": kept,
            "rejected": len(rejected),
            "rejected_by_reason": pd.Series([r["reason"] for r in rejected], dtype=str).value_counts().to_dict(),
            "image_size": list(params.image_size),
            "channels": params.channels,
        }
        (tmp / CLASSES).write_text(json.dumps(classes) + "\n")
        pd.DataFrame(rejected, columns=["file", "label", "split", "reason"]).to_csv(tmp / REJECTED, index=False)
        write_json(tmp / REPORT, report)
    return report


def write_subset(rows, raw_dir, params, class_ids, out_dir, subset):
    """Stream one subset into <subset>_images.npy / _labels.npy; return (kept, rejected rows)."""
    height, width = params.image_size
    shape = (len(rows), height, width, params.channels)
    images_path = out_dir / f"{subset}_images.npy"
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
    labels = np.empty(len(rows), dtype=np.int64)
    rejected = []
    kept = 0
    for row in progress(rows.itertuples(index=False), f"preprocess: {subset}", total=len(rows)):
        try:
            images[kept] = decode_image(raw_dir / row.file, params.image_size, params.channels)
        except BadImage as exc:
            rejected.append({"file": row.file, "label": row.label, "split": subset, "reason": str(exc)})
            continue
        labels[kept] = class_ids[row.label]
        kept += 1
    images.flush()
    del images
    if kept < len(rows):
        shrink_npy(images_path, kept)
    np.save(out_dir / f"{subset}_labels.npy", labels[:kept])
    return kept, rejected


def shrink_npy(path: Path, n: int, chunk: int = 1024) -> None:
    """Keep the first `n` rows of a .npy file, copying in chunks to bound memory."""
    source = np.load(path, mmap_mode="r")
    tmp = path.with_name(f".{path.name}.shrink")
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=source.dtype, shape=(n, *source.shape[1:]))
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        target[start:end] = source[start:end]
    target.flush()
    del target, source
    tmp.replace(path)


def read_manifest(split_dir: str | Path) -> pd.DataFrame:
    path = Path(split_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path} not found: run the split stage first (dvc repro split)")
    return pd.read_csv(path, dtype={"file": str, "label": str, "split": str})


def _run(params: Params, args: argparse.Namespace) -> None:
    manifest = read_manifest(args.split_dir)
    report = preprocess(manifest, args.raw_dir, params.preprocess, args.out_dir)
    print(f"preprocess: kept {report['kept']}, set aside {report['rejected']} -> {args.out_dir}")


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
