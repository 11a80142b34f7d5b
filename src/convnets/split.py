"""Stage `split`: choose the train/val/test images and write them as a manifest.

Two methods (split.method):

- stratified: a seeded random split of train_size / val_size / test_size images,
  each subset with the classes in the data set's proportions (MNIST);
- index_ranges: per class, the images whose file index lies in [start, stop) of
  train_range / val_range / test_range: the book's make_subset, which puts
  cat.0.jpg ... cat.999.jpg (and the same dogs) in train, 1000-1499 in
  validation and 1500-2499 in test.

The manifest (data/split/manifest.csv: file,label,index,split) names images
rather than copying them, so it is cheap to version and easy to diff.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from convnets.cli import stage_main
from convnets.errors import DataError, ParamsError
from convnets.layout import CATALOG, MANIFEST, SUBSETS
from convnets.outputs import staged_dir
from convnets.params import Params, SplitParams

log = logging.getLogger(__name__)


def split(catalog: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    """Return the catalog rows chosen for each subset, with a `split` column."""
    if params.method == "index_ranges":
        return sort_manifest(split_by_index_ranges(catalog, params))
    return sort_manifest(split_stratified(catalog, params, seed))


def split_stratified(catalog: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    check_sizes(params, available=len(catalog))
    labels = catalog["label"]
    rest, test = train_test_split(catalog, test_size=params.test_size, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest,
        train_size=params.train_size,
        test_size=params.val_size,
        stratify=rest["label"],
        random_state=seed,
    )
    parts = [part.assign(split=name) for name, part in zip(SUBSETS, (train, val, test))]
    return pd.concat(parts, ignore_index=True)


def split_by_index_ranges(catalog: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Per class, the images whose index is in each subset's [start, stop)."""
    ranges = {name: getattr(params, f"{name}_range") for name in SUBSETS}
    check_ranges(catalog, ranges)
    parts = []
    for name, (start, stop) in ranges.items():
        chosen = catalog[(catalog["index"] >= start) & (catalog["index"] < stop)]
        report_gaps(chosen, name, start, stop)
        parts.append(chosen.assign(split=name))
    return pd.concat(parts, ignore_index=True)


def check_ranges(catalog: pd.DataFrame, ranges: dict[str, list[int]]) -> None:
    """Ranges reaching past a class's last index are an error that says how many images there are."""
    counts = catalog.groupby("label")["index"].agg(["size", "max"])
    for name, (start, stop) in ranges.items():
        for label, (size, last) in counts.iterrows():
            if stop - 1 > last:
                raise ParamsError(
                    f"split.{name}_range {[start, stop]} needs {label!r} images up to index {stop - 1}, "
                    f"but the data set has {size} {label!r} images, indices up to {last} "
                    f"({len(catalog)} images in all)"
                )


def report_gaps(chosen: pd.DataFrame, subset: str, start: int, stop: int) -> None:
    # Files set aside by fetch leave holes in a range; say so rather than silently shrink.
    for label, n in chosen.groupby("label").size().items():
        if n < stop - start:
            log.warning("split: %s has %d %r images, %d of its indices are missing", subset, n, label, stop - start - n)


def sort_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(SUBSETS)}
    return manifest.sort_values(
        by=["split", "label", "index"], key=lambda col: col.map(order) if col.name == "split" else col
    ).reset_index(drop=True)


def check_sizes(params: SplitParams, available: int) -> None:
    wanted = params.train_size + params.val_size + params.test_size
    if wanted > available:
        raise ParamsError(
            f"split.train_size + split.val_size + split.test_size = {wanted}, "
            f"but the data set has only {available} images"
        )


def read_catalog(raw_dir: str | Path) -> pd.DataFrame:
    path = Path(raw_dir) / CATALOG
    if not path.exists():
        raise DataError(f"{path} not found: run the fetch stage first (dvc repro fetch)")
    return pd.read_csv(path, dtype={"file": str, "label": str, "index": int})


def _run(params: Params, args: argparse.Namespace) -> None:
    catalog = read_catalog(args.raw_dir)
    manifest = split(catalog, params.split, params.seed)
    with staged_dir(args.out_dir) as tmp:
        manifest.to_csv(tmp / MANIFEST, index=False)
    counts = manifest["split"].value_counts().reindex(SUBSETS).to_dict()
    print(f"split: {counts} -> {args.out_dir}/{MANIFEST}")


def main(argv=None) -> int:
    return stage_main(
        __doc__.splitlines()[0],
        [("raw_dir", "fetched data (data/raw)"), ("out_dir", "output folder (data/split)")],
        _run,
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
