"""Stage `split`: a seeded, stratified train/val/test split written as a manifest.

The manifest (data/split/manifest.csv: file,label,index,split) names images
rather than copying them, so it is cheap to version and easy to diff.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from convnets.cli import stage_main
from convnets.errors import DataError, ParamsError
from convnets.fetch import CATALOG
from convnets.outputs import staged_dir
from convnets.params import Params, SplitParams

MANIFEST = "manifest.csv"
SUBSETS = ("train", "val", "test")


def split(catalog: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    """Return the catalog rows chosen for each subset, with a `split` column."""
    check_sizes(params, available=len(catalog))
    labels = catalog["label"]
    rest, test = train_test_split(
        catalog, test_size=params.test_size, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        train_size=params.train_size,
        test_size=params.val_size,
        stratify=rest["label"],
        random_state=seed,
    )
    parts = [part.assign(split=name) for name, part in zip(SUBSETS, (train, val, test))]
    manifest = pd.concat(parts, ignore_index=True)
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
