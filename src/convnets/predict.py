"""Label new photos with a trained model: one CSV row per file, bad files listed, never a crash.

    python -m convnets.predict data/model photos/ predictions.csv
    python -m convnets.predict data/model test1/ predictions.csv --kaggle-submission submission.csv

INPUT is one image file or a folder (searched recursively; hidden files are
skipped). Each file is decoded like `preprocess` does (any size; JPEG, PNG, GIF,
BMP, WebP or TIFF; converted to the model's channels and resized to its input
size, both read from the saved model), so the model sees what it was trained on.

Writes OUT.csv with columns file (relative to INPUT), label and probability
(the model's probability for that label), and, when some files cannot be
decoded, OUT.rejected.csv with file, reason and detail.

--kaggle-submission writes the Dogs vs. Cats competition's format (as its
sampleSubmission.csv): id,label with id the number of test1/<id>.jpg and label
the probability that the photo shows a dog. A test photo that cannot be decoded
gets 0.5 (a guess), so the file stays complete; the command says how many.

--tta averages each photo's probabilities with its left-right mirror image's, as
evaluate.tta does (for photos whose mirror shows the same class, not digits).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convnets.errors import DataError, PipelineError
from convnets.images import BadImage, decode_image
from convnets.outputs import atomic_file
from convnets.progress import progress
from convnets.trained import class_columns, load_trained

KAGGLE_POSITIVE = "dog"


@dataclass
class Predictions:
    rows: pd.DataFrame  # file, label, probability, positive (probability of the second class, two classes only)
    rejected: pd.DataFrame  # file, reason, detail
    classes: list[str]


def list_inputs(source: Path) -> tuple[Path, list[Path]]:
    """(root the CSV names files relative to, the files in a stable order)."""
    if source.is_file():
        return source.parent, [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    files = sorted(
        path
        for path in source.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )
    if not files:
        raise DataError(f"{source}: the folder holds no files")
    return source, files


def decoded_batches(
    files: list[Path], size: tuple[int, int], channels: int, batch_size: int
) -> Iterator[tuple[list[Path], np.ndarray, list[tuple[Path, BadImage]]]]:
    """Decode files batch by batch: (good files, their pixels, bad files with why)."""
    for start in range(0, len(files), batch_size):
        good, arrays, bad = [], [], []
        for path in files[start : start + batch_size]:
            try:
                arrays.append(decode_image(path, size, channels))
                good.append(path)
            except BadImage as exc:
                bad.append((path, exc))
        pixels = np.stack(arrays) if arrays else np.empty((0, *size, channels), np.uint8)
        yield good, pixels, bad


def predict(
    model_dir: str | Path,
    source: str | Path,
    batch_size: int = 64,
    heatmaps: str | Path | None = None,
    tta: bool = False,
) -> Predictions:
    model, classes = load_trained(model_dir)
    _, height, width, channels = model.input_shape
    root, files = list_inputs(Path(source))
    rows, rejected = [], []
    batches = decoded_batches(files, (height, width), channels, batch_size)
    for good, pixels, bad in progress(batches, "predict", total=-(-len(files) // batch_size), unit="batch"):
        rejected += [{"file": relative(path, root), "reason": exc.reason, "detail": exc.detail} for path, exc in bad]
        if not good:
            continue
        probs = probabilities(model, pixels, tta)
        chosen = probs.argmax(axis=1)
        if heatmaps is not None:
            write_overlays(model, good, pixels, chosen, root, Path(heatmaps))
        for path, row, label in zip(good, probs, chosen):
            rows.append(
                {
                    "file": relative(path, root),
                    "label": classes[label],
                    "probability": round(float(row[label]), 6),
                    "positive": round(float(row[1]), 6) if len(classes) == 2 else float("nan"),
                }
            )
    return Predictions(
        pd.DataFrame(rows, columns=["file", "label", "probability", "positive"]),
        pd.DataFrame(rejected, columns=["file", "reason", "detail"]),
        classes,
    )


def probabilities(model, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
    """[n, classes]; with `tta` the mean of each photo's and its left-right mirror image's."""
    probs = class_columns(model.predict_on_batch(pixels))
    if tta:
        probs = (probs + class_columns(model.predict_on_batch(np.ascontiguousarray(pixels[:, :, ::-1])))) / 2
    return probs


def write_overlays(model, files: list[Path], pixels: np.ndarray, chosen: np.ndarray, root: Path, out: Path) -> None:
    """DIR/<file>.png: the photo as the model saw it and its Grad-CAM overlay (the photo alone without one)."""
    from convnets.gradcam import heatmaps_for, save_overlay

    _, maps, _ = heatmaps_for(model, pixels, chosen)
    for path, image, heatmap in zip(files, pixels, maps):
        save_overlay(out / f"{relative(path, root)}.png", image, heatmap)


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def kaggle_submission(predictions: Predictions) -> tuple[pd.DataFrame, int]:
    """id,label (probability of a dog) for every test1/<id>.<ext>; undecodable photos get 0.5."""
    if predictions.classes != ["cat", KAGGLE_POSITIVE]:
        raise DataError(
            "--kaggle-submission needs a cats-vs-dogs model (classes ['cat', 'dog']), "
            f"this one has {predictions.classes}"
        )
    table = pd.concat(
        [predictions.rows[["file", "positive"]], predictions.rejected[["file"]].assign(positive=0.5)],
        ignore_index=True,
    )
    table["id"] = table["file"].map(kaggle_id)
    misnamed = table.loc[table["id"].isna(), "file"]
    if len(misnamed):
        raise DataError(
            f"--kaggle-submission: {len(misnamed)} file(s) are not named <id>.jpg like test1's, e.g. {misnamed.iloc[0]}"
        )
    table = table.astype({"id": int}).sort_values("id")
    submission = pd.DataFrame({"id": table["id"], "label": table["positive"].round(6)})
    return submission.reset_index(drop=True), len(predictions.rejected)


def kaggle_id(file: str) -> float:
    stem = Path(file).stem
    return float(int(stem)) if stem.isdigit() else float("nan")


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


def rejected_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.rejected.csv")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    predictions = predict(args.model_dir, args.input, args.batch_size, args.heatmaps, args.tta)
    if predictions.rows.empty:
        raise DataError(f"{args.input}: none of the {len(predictions.rejected)} file(s) could be decoded")
    submission = None
    if args.kaggle_submission:
        submission, guessed = kaggle_submission(predictions)
    write_csv_atomic(predictions.rows[["file", "label", "probability"]], out)
    print(f"predict: {len(predictions.rows)} file(s) labelled -> {out}")
    stale = rejected_path(out)
    if len(predictions.rejected):
        write_csv_atomic(predictions.rejected, stale)
        print(f"predict: {len(predictions.rejected)} file(s) could not be decoded, listed in {stale}")
    elif stale.exists():
        stale.unlink()  # from an earlier run: it would list files that are fine now
    if submission is not None:
        write_csv_atomic(submission, Path(args.kaggle_submission))
        note = f" ({guessed} undecodable photo(s) given 0.5)" if guessed else ""
        print(f"predict: Kaggle submission of {len(submission)} rows -> {args.kaggle_submission}{note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("model_dir", help="folder with model.keras and classes.json (data/model)")
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("out", help="CSV to write: file,label,probability")
    parser.add_argument(
        "--kaggle-submission", metavar="CSV", help="also write the Dogs vs. Cats submission (id,label = P(dog))"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per prediction batch (default: %(default)s)")
    parser.add_argument(
        "--heatmaps", metavar="DIR", help="also write DIR/<file>.png: each photo with its Grad-CAM heatmap"
    )
    parser.add_argument(
        "--tta", action="store_true", help="average each photo's probabilities with its mirror image's (left-right)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
