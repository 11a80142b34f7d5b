"""split.method index_ranges: the book's make_subset, per class, from the catalog's file indices."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import yaml

from conftest import SHARED_DIR
from convnets.errors import ParamsError
from convnets.params import FetchParams, SplitParams
from convnets.split import read_catalog, split

REPLICA = SHARED_DIR / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"
BOOK = SplitParams(method="index_ranges", train_range=[0, 1000], val_range=[1000, 1500], test_range=[1500, 2500])


def books_make_subset() -> set[tuple[str, str]]:
    """What the book's make_subset copies: (subset, file name) for each of its three calls."""
    chosen = set()
    for subset, start_index, end_index in (("train", 0, 1000), ("val", 1000, 1500), ("test", 1500, 2500)):
        for category in ("cat", "dog"):
            chosen |= {(subset, f"{category}.{i}.jpg") for i in range(start_index, end_index)}
    return chosen


def catalog_of(per_class: int, missing=(), seed=0) -> pd.DataFrame:
    rows = [
        (f"images/{label}/{label}.{i}.jpg", label, i)
        for label in ("cat", "dog")
        for i in range(per_class)
        if (label, i) not in missing
    ]
    random.Random(seed).shuffle(rows)  # the catalog's order must not matter
    return pd.DataFrame(rows, columns=["file", "label", "index"])


def as_book_pairs(manifest: pd.DataFrame) -> set[tuple[str, str]]:
    return {(row.split, row.file.rsplit("/", 1)[1]) for row in manifest.itertuples()}


def test_index_ranges_are_exactly_the_books_subsets():
    manifest = split(catalog_of(3000), BOOK, seed=0)
    assert len(manifest) == 5000
    assert as_book_pairs(manifest) == books_make_subset()
    assert manifest.groupby(["split", "label"]).size().to_dict() == {
        ("test", "cat"): 1000,
        ("test", "dog"): 1000,
        ("train", "cat"): 1000,
        ("train", "dog"): 1000,
        ("val", "cat"): 500,
        ("val", "dog"): 500,
    }
    assert list(manifest["split"].drop_duplicates()) == ["train", "val", "test"]


def test_index_ranges_ignore_the_seed():
    catalog = catalog_of(2600)
    pd.testing.assert_frame_equal(split(catalog, BOOK, seed=1), split(catalog, BOOK, seed=2))


@pytest.mark.skipif(not REPLICA.is_file(), reason=f"the offline replica {REPLICA} is not there")
def test_the_preset_on_the_replica_gives_the_books_subset(tmp_path, repo_root):
    from convnets.fetch import fetch

    preset = yaml.safe_load((repo_root / "conf" / "dataset" / "dogs_vs_cats.yaml").read_text())
    fetch(FetchParams.model_validate({**preset["fetch"], "archive": str(REPLICA)}), tmp_path / "raw")
    manifest = split(read_catalog(tmp_path / "raw"), SplitParams.model_validate(preset["split"]), seed=42)
    assert as_book_pairs(manifest) == books_make_subset()
    assert all((tmp_path / "raw" / f).is_file() for f in manifest["file"])


def test_ranges_beyond_the_data_say_how_many_images_there_are():
    too_far = SplitParams(
        method="index_ranges", train_range=[0, 1000], val_range=[1000, 1500], test_range=[1500, 12500]
    )
    with pytest.raises(ParamsError) as info:
        split(catalog_of(11500), too_far, seed=0)
    assert str(info.value) == (
        "split.test_range [1500, 12500] needs 'cat' images up to index 12499, but the data set has "
        "11500 'cat' images, indices up to 11499 (23000 images in all)"
    )


def test_holes_in_a_range_are_reported_not_filled(caplog):
    manifest = split(catalog_of(2500, missing={("dog", 7), ("dog", 1200)}), BOOK, seed=0)
    counts = manifest.groupby(["split", "label"]).size()
    assert counts["train", "dog"] == 999 and counts["val", "dog"] == 499 and counts["train", "cat"] == 1000
    assert "train has 999 'dog' images, 1 of its indices are missing" in caplog.text


def test_stratified_sizes_still_work():
    manifest = split(catalog_of(300), SplitParams(train_size=200, val_size=100, test_size=100), seed=3)
    assert manifest["split"].value_counts().to_dict() == {"train": 200, "val": 100, "test": 100}
    with pytest.raises(ParamsError, match="but the data set has only 600 images"):
        split(catalog_of(300), SplitParams(train_size=400, val_size=100, test_size=101), seed=3)


def test_ranges_must_be_ordered_and_disjoint():
    with pytest.raises(ValueError, match="train_range and val_range overlap"):
        SplitParams(method="index_ranges", train_range=[0, 1000], val_range=[999, 1500])
    with pytest.raises(ValueError, match=r"test_range \[2500, 1500\]: start must be below stop"):
        SplitParams(method="index_ranges", test_range=[2500, 1500])
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        SplitParams(method="index_ranges", train_range=[-1, 1000])


def test_split_stage_writes_the_manifest(tmp_path, capsys):
    from conftest import write_params
    from convnets.split import main

    raw = tmp_path / "raw"
    raw.mkdir()
    catalog_of(2500).to_csv(raw / "catalog.csv", index=False)
    params = write_params(tmp_path / "params.yaml", {"split": BOOK.model_dump()})
    assert main([str(raw), str(tmp_path / "split"), "--params", str(params)]) == 0
    manifest = pd.read_csv(tmp_path / "split" / "manifest.csv")
    assert list(manifest.columns) == ["file", "label", "index", "split"]
    assert as_book_pairs(manifest) == books_make_subset()
