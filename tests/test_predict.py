"""`python -m convnets.predict`: label a file or folder of photos, list bad files, write Kaggle's format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import SHARED_DIR
from convnets.images import decode_image
from convnets.params import Params
from convnets.predict import main
from convnets.train import train
from test_train_pipeline import make_prepared

REPLICA = SHARED_DIR / "data" / "dogs-vs-cats-128" / "dogs-vs-cats.zip"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A cats-vs-dogs model trained on 32 x 32 synthetic photos (dogs carry a bright square)."""
    root = tmp_path_factory.mktemp("predict")
    prepared = make_prepared(root / "prepared", sizes=(96, 32, 8))
    params = Params.model_validate(
        {"model": {"conv_filters": [8, 16], "pooled_blocks": 2}, "train": {"epochs": 3, "batch_size": 16}}
    )
    # A private user cache for the resume state: the per-test one (conftest.user_cache) is not set
    # yet in a module fixture, and another process training the same params shared ~/.cache.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "user-cache"))
        train(params, prepared, root / "model", root / "train")
    return root / "model"


def photo(seed: int, dog: bool, size: int = 80) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
    if dog:
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 120
    return Image.fromarray(pixels)


@pytest.fixture
def photo_folder(tmp_path):
    """Good photos in several formats, sizes and modes, nested; plus the usual bad files."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    photo(1, dog=True).save(folder / "1.jpg")
    photo(2, dog=False, size=50).save(folder / "2.png")
    photo(3, dog=True, size=120).convert("L").save(folder / "3.jpg")  # grayscale, larger
    photo(4, dog=False).convert("CMYK").save(folder / "more" / "4.tiff")
    photo(5, dog=True).save(folder / "5.webp")
    (folder / "6.jpg").write_bytes(b"")  # empty
    jpeg = io.BytesIO()
    photo(7, dog=True).save(jpeg, "JPEG")
    (folder / "7.jpg").write_bytes(jpeg.getvalue()[:200])  # cut short
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".DS_Store").write_bytes(b"\0\0")  # hidden: skipped, not reported
    return folder


def read(path):
    return pd.read_csv(path, dtype={"file": str, "label": str})


def test_folder_of_mixed_photos(model_dir, photo_folder, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert main([str(model_dir), str(photo_folder), str(out)]) == 0
    rows = read(out)
    assert list(rows.columns) == ["file", "label", "probability"]
    assert list(rows["file"]) == ["1.jpg", "2.png", "3.jpg", "5.webp", "more/4.tiff"]
    assert set(rows["label"]) <= {"cat", "dog"} and rows["probability"].between(0.5, 1.0).all()
    rejected = read(out.with_name("predictions.rejected.csv"))
    assert dict(zip(rejected["file"], rejected["reason"])) == {
        "6.jpg": "empty_file",
        "7.jpg": "truncated",
        "notes.txt": "not_an_image",
    }
    printed = capsys.readouterr().out
    assert "5 file(s) labelled" in printed and "3 file(s) could not be decoded" in printed


def test_predictions_are_the_models_on_preprocess_decoded_pixels(model_dir, photo_folder, tmp_path):
    """Same decoding as preprocess (resize to the model's input, RGB): the same probabilities."""
    out = tmp_path / "p.csv"
    main([str(model_dir), str(photo_folder), str(out), "--batch-size", "2"])
    rows = read(out).set_index("file")
    model = keras.models.load_model(model_dir / "model.keras")
    classes = json.loads((model_dir / "classes.json").read_text())
    for name in ("1.jpg", "3.jpg", "more/4.tiff"):
        pixels = decode_image(photo_folder / name, (32, 32), 3)
        p_dog = float(model.predict(pixels[None], verbose=0)[0, 0])
        label = classes[int(p_dog > 0.5)]
        assert rows.loc[name, "label"] == label
        assert rows.loc[name, "probability"] == pytest.approx(max(p_dog, 1 - p_dog), abs=1e-5)
    # The model learnt the square: the dogs drawn with one come out as dogs.
    assert rows.loc["1.jpg", "label"] == "dog" and rows.loc["2.png", "label"] == "cat"


def test_tta_averages_each_photo_with_its_mirror_image(model_dir, photo_folder, tmp_path):
    """--tta: the probabilities are the mean of the photo's and its left-right flip's, as evaluate.tta."""
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert main([str(model_dir), str(photo_folder), str(plain)]) == 0
    assert main([str(model_dir), str(photo_folder), str(tta), "--tta", "--batch-size", "2"]) == 0
    model = keras.models.load_model(model_dir / "model.keras")
    rows, plain_rows = read(tta).set_index("file"), read(plain).set_index("file")
    assert list(rows.index) == list(plain_rows.index)
    changed = 0
    for name in rows.index:
        pixels = decode_image(photo_folder / name, (32, 32), 3)
        p_dog = float(model.predict(np.stack([pixels, pixels[:, ::-1]]), verbose=0).mean())
        assert rows.loc[name, "probability"] == pytest.approx(max(p_dog, 1 - p_dog), abs=1e-5)
        changed += rows.loc[name, "probability"] != plain_rows.loc[name, "probability"]
    assert changed  # the mirror images moved some probabilities: the flag did something


def test_heatmaps_are_each_photo_beside_its_overlay(model_dir, photo_folder, tmp_path):
    """`predict --heatmaps DIR`: DIR/<file>.png per decodable photo, the photo and its Grad-CAM overlay side by side."""
    from convnets.gradcam import heatmaps_for

    out = tmp_path / "heat"
    assert main([str(model_dir), str(photo_folder), str(tmp_path / "p.csv"), "--heatmaps", str(out)]) == 0
    rows = read(tmp_path / "p.csv")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{name}.png" for name in rows["file"])  # nested folders kept, none for bad files
    model = keras.models.load_model(model_dir / "model.keras")
    classes = json.loads((model_dir / "classes.json").read_text())
    pixels = np.stack([decode_image(photo_folder / name, (32, 32), 3) for name in rows["file"]])
    _, maps, _ = heatmaps_for(model, pixels, np.array([classes.index(label) for label in rows["label"]]))
    assert any(heatmap is not None for heatmap in maps)  # the dogs' squares at least raise the dog score
    for name, seen, heatmap in zip(rows["file"], pixels, maps):
        tile = np.asarray(Image.open(out / f"{name}.png").convert("RGB")).astype(int)
        side = tile.shape[0]
        assert side >= 128, name  # 32 px photos are scaled up to be seen
        scale = side // 32
        assert np.array_equal(tile[:, :side], seen.repeat(scale, 0).repeat(scale, 1)), name  # as the model saw it
        if heatmap is None:
            assert tile.shape[1] == side, name  # the photo alone
            continue
        # As test_gradcam's overlay test: twice as wide as the photo alone, and the right half is not the photo again.
        assert tile.shape[1] > 2 * side - 10, name
        assert np.abs(tile[:, :side] - tile[:, -side:]).mean() > 10, name


def test_one_file_and_no_stale_rejected_list(model_dir, photo_folder, tmp_path):
    out = tmp_path / "one.csv"
    stale = tmp_path / "one.rejected.csv"
    stale.write_text("file,reason,detail\nold.jpg,empty_file,zero bytes\n")
    assert main([str(model_dir), str(photo_folder / "2.png"), str(out)]) == 0
    assert list(read(out)["file"]) == ["2.png"]
    assert not stale.exists()


def test_kaggle_submission(model_dir, photo_folder, tmp_path, capsys):
    (photo_folder / "notes.txt").unlink()
    (photo_folder / "more" / "4.tiff").rename(photo_folder / "10.tiff")
    (photo_folder / "more").rmdir()
    submission = tmp_path / "submission.csv"
    code = main([str(model_dir), str(photo_folder), str(tmp_path / "p.csv"), "--kaggle-submission", str(submission)])
    assert code == 0
    table = pd.read_csv(submission)
    assert list(table.columns) == ["id", "label"]
    assert list(table["id"]) == [1, 2, 3, 5, 6, 7, 10]  # numeric order, as sampleSubmission.csv
    rows = read(tmp_path / "p.csv").set_index("file")
    p_dog = {f: (p if label == "dog" else 1 - p) for f, label, p in zip(rows.index, rows["label"], rows["probability"])}
    labels = dict(zip(table["id"], table["label"]))
    assert labels[1] == pytest.approx(p_dog["1.jpg"], abs=2e-6) and labels[2] == pytest.approx(p_dog["2.png"], abs=2e-6)
    assert labels[6] == 0.5 and labels[7] == 0.5  # undecodable: a guess, so the file stays complete
    assert "2 undecodable photo(s) given 0.5" in capsys.readouterr().out


def test_kaggle_submission_refuses_files_not_named_like_test1(model_dir, photo_folder, tmp_path, capsys):
    code = main(
        [str(model_dir), str(photo_folder), str(tmp_path / "p.csv"), "--kaggle-submission", str(tmp_path / "s.csv")]
    )
    assert code == 1
    assert "not named <id>.jpg like test1's" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no-model", "model.keras not found"),
        ("no-input", "no such file or folder"),
        ("only-bad", "none of the 2 file(s) could be decoded"),
        ("empty-folder", "holds no files"),
    ],
)
def test_errors_are_one_line_and_exit_1(model_dir, tmp_path, capsys, setup, message):
    folder = tmp_path / "in"
    folder.mkdir()
    model = model_dir
    source = folder
    if setup == "no-model":
        model = tmp_path / "nothing"
        (folder / "1.jpg").write_bytes(b"")
    elif setup == "no-input":
        source = tmp_path / "missing"
    elif setup == "only-bad":
        (folder / "a.jpg").write_bytes(b"")
        (folder / "b.txt").write_text("x")
    code = main([str(model), str(source), str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.skipif(not REPLICA.is_file(), reason=f"the offline replica {REPLICA} is not there")
def test_command_line_on_the_replicas_test1_photos(model_dir, tmp_path):
    """Real photos of test1 (128 px JPEGs), through the documented command line."""
    folder = tmp_path / "test1"
    folder.mkdir()
    with zipfile.ZipFile(REPLICA) as outer, zipfile.ZipFile(io.BytesIO(outer.read("test1.zip"))) as inner:
        for i in range(1, 13):
            (folder / f"{i}.jpg").write_bytes(inner.read(f"test1/{i}.jpg"))
        sample = pd.read_csv(io.BytesIO(outer.read("sampleSubmission.csv")))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "convnets.predict",
            str(model_dir),
            str(folder),
            str(tmp_path / "p.csv"),
            "--kaggle-submission",
            str(tmp_path / "submission.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == list(sample.columns)
    assert list(submission["id"]) == list(sample["id"][:12])
    assert submission["label"].between(0, 1).all()
