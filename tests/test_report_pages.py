"""report.html and compare.html as a person sees them: opened in headless Chromium, and their parts."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from browser import INSTALL_HINT, PAGE_FACTS, chromium, open_page

from convnets import compare
from convnets.figures import training_seconds
from convnets.gradcam import read_heatmaps
from convnets.params import Params
from convnets.presentation import RunHeader, format_duration, header_rows
from convnets.presets import identify_preset, load_presets
from convnets.report import report
from test_train_pipeline import PREPARED_PREPROCESS, make_prepared

needs_browser = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason=INSTALL_HINT)


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    """A two-class run (synthetic 'dogs' with a bright square) through train, evaluate and report."""
    from convnets.evaluate import evaluate
    from convnets.train import train

    root = tmp_path_factory.mktemp("report")
    prepared = make_prepared(root / "prepared", sizes=(64, 32, 48))
    # A cat drawn as a dog and a dog as a cat: mistakes for any model that learnt the square
    # (and one that did not makes others), so the page always has mistakes and heatmaps to show.
    labels = np.load(prepared / "test_labels.npy")
    labels[:2] = 1 - labels[:2]
    np.save(prepared / "test_labels.npy", labels)
    params = Params.model_validate(
        {
            "preprocess": PREPARED_PREPROCESS,
            "model": {"conv_filters": [8, 16], "pooled_blocks": 1},
            "train": {"epochs": 2, "batch_size": 16},
            "evaluate": {"heatmaps": 6},
            "report": {"misclassified_examples": 8},
        }
    )
    train(params, prepared, root / "model", root / "train")
    evaluate(params, prepared, root / "model", root / "eval")
    (root / "train" / "devices.json").write_text(json.dumps({"gpus": [], "dtype_policy": "float32", "replicas": 1}))
    html = report(
        params,
        prepared,
        root / "train",
        root / "eval",
        root / "report",
        timings={"seconds": 75.0},
        run={"experiment": "tiny-exp", "commit": "abc1234"},
    )
    return {"root": root, "html": html, "params": params}


def test_report_header_says_what_ran(binary_report):
    page = binary_report["html"].read_text()
    for shown in ("tiny-exp", "abc1234", "CPU", "float32", "1 min 15 s", "2 of 2"[:1]):
        assert shown in page
    assert "Best epoch" in page and "ROC AUC" in page and "macro F1" in page
    assert "Kept per subset" in page and "Set aside, by reason" in page and "Conversions made" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "<link" not in page and "<script" not in page


def test_report_shows_the_heatmaps_evaluate_computed(binary_report):
    from PIL import Image

    root = binary_report["root"]
    predictions = pd.read_csv(root / "eval" / "predictions.csv")
    wrong = predictions.query("true != predicted")
    assert len(wrong) >= 2  # the fixture's relabelled photos at least
    _, maps = read_heatmaps(root / "eval" / "gradcam.json")
    assert 1 <= len(maps) <= 6 and set(maps) <= set(wrong["row"])  # heatmaps of mistakes only
    tiles = sorted((root / "report" / "misclassified").iterdir())
    assert len(tiles) == min(len(wrong), 8)
    page = binary_report["html"].read_text()
    # The heatmaps are of the 6 most confident mistakes, all among the 8 shown: every one is on the page.
    assert f"{len(tiles)} of {len(wrong)} misclassified test photos shown" in page
    assert f"{len(maps)} with the Grad-CAM heatmap" in page
    assert page.count(" · no heatmap</figcaption>") == len(tiles) - len(maps)
    # A tile with a heatmap is the photo and its overlay side by side; one without is the photo alone.
    wide = [tile for tile in tiles if Image.open(tile).width > 1.5 * Image.open(tile).height]
    assert len(wide) == len(maps)


def test_report_is_the_same_bytes_when_rerun(binary_report, tmp_path):
    root, params = binary_report["root"], binary_report["params"]
    again = report(
        params,
        root / "prepared",
        root / "train",
        root / "eval",
        tmp_path / "report",
        timings={"seconds": 75.0},
        run={"experiment": "tiny-exp", "commit": "abc1234"},
    )
    assert again.read_bytes() == binary_report["html"].read_bytes()


def test_report_without_heatmaps_or_timings_still_renders(binary_report, tmp_path):
    import shutil

    root = binary_report["root"]
    eval_dir = tmp_path / "eval"
    shutil.copytree(root / "eval", eval_dir)
    (eval_dir / "gradcam.json").unlink()
    html = report(binary_report["params"], root / "prepared", root / "train", eval_dir, tmp_path / "out", run={})
    assert "0 with the Grad-CAM heatmap" in html.read_text() or "misclassified test photos." in html.read_text()


def test_preset_and_changed_params_are_named(repo_root, tmp_path):
    import yaml

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    presets = load_presets(repo_root / "conf")
    found = identify_preset(params, presets)
    assert (found["dataset"], found["preset"], found["changed"]) == ("mnist", "mnist_convnet", [])
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"  # what `dvc exp run -S +experiment=scratch -S ...=[128,128]` composes
    compose_and_dump(
        out,
        os.fspath(repo_root / "conf"),
        None,
        "config",
        "",
        ["+experiment=scratch", "preprocess.image_size=[128,128]"],
    )
    params = yaml.safe_load(out.read_text())
    found = identify_preset(params, presets)
    assert (found["dataset"], found["preset"]) == ("dogs_vs_cats", "scratch")
    assert found["changed"] == [("preprocess.image_size", [128, 128], [180, 180])]


def test_the_header_says_what_a_run_does_not_know_and_escapes_the_rest():
    blank = dict(header_rows(RunHeader()))
    assert blank["Experiment"] == "— (a workspace run)" and blank["Params changed from the preset"] == "none"
    assert blank["Preset"] == "" and blank["Training time"] == ""
    header = RunHeader(
        experiment="<lr>",
        preset="scratch",
        changed=[("train.epochs", 20, 30)],
        training_seconds=75.0,
        training_exact=False,
    )
    rows = dict(header_rows(header))
    assert list(rows)[:2] == ["Experiment", "Commit"] and len(rows) == 10
    assert rows["Experiment"] == "&lt;lr&gt;" and rows["Preset"] == "scratch (conf/model/)"
    assert rows["Params changed from the preset"] == "<code>train.epochs=20</code>"
    assert rows["Training time"] == "≈ 1 min 15 s"


def test_training_time_is_read_defensively():
    assert training_seconds({}, {"seconds": 12.5}, 3) == (12.5, True)
    assert training_seconds({"seconds_per_epoch": 2.0}, None, 3) == (6.0, False)
    assert training_seconds({}, None, 3) == (None, False)
    assert (
        format_duration(None) == "" and format_duration(3725) == "1 h 02 min" and format_duration(6, False) == "≈ 6 s"
    )


@needs_browser
@pytest.mark.parametrize("width", [1280, 390], ids=["wide", "phone"])
def test_report_opens_cleanly_in_a_browser(binary_report, width):
    seen = open_page(binary_report["html"], PAGE_FACTS, width=width)
    assert seen["console_errors"] == [] and seen["requests"] == []
    facts = seen["value"]
    assert facts["images"] and all(i["complete"] and i["width"] > 0 for i in facts["images"])
    accuracy = json.loads((binary_report["root"] / "eval" / "metrics.json").read_text())["test"]["accuracy"]
    assert facts["accuracy"] == f"{accuracy:.4f}" and float(facts["accuracyValue"]) == accuracy
    assert not facts["overflowX"]  # nothing wider than a phone's screen


# --- compare --------------------------------------------------------------------------------


def exp(name, rev, seed=42, filters=(32, 64), accuracy=None, failed=False, state=None):
    metrics = {}
    if accuracy is not None:
        metrics = {
            "data/eval/metrics.json": {"data": {"test": {"accuracy": accuracy, "roc_auc": accuracy + 0.05}}},
            "data/train/metrics.json": {
                "data": {"step": 9, "best": {"epoch": 4}, "devices": {"gpu_count": 0, "mixed_precision": 0}}
            },
            "timings/train.json": {"data": {"seconds": 95.0}},
        }
    params = {
        "params.yaml": {"data": {"seed": seed, "model": {"conv_filters": list(filters)}, "train": {"epochs": 10}}}
    }
    return {
        "executor": {"state": state} if state else None,
        "name": name,
        "revs": [
            {
                "rev": rev,
                "name": name,
                "error": {"msg": "boom"} if failed else None,
                "data": {"params": params, "metrics": metrics},
            }
        ],
    }


SHOW = [
    {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
    {
        "rev": "c" * 40,
        "name": "main",
        "data": {},
        "error": None,
        "experiments": [
            exp("seed-1", "1" * 40, seed=1, accuracy=0.70),
            exp("seed-2", "2" * 40, seed=2, accuracy=0.80),
            exp("wide", "3" * 40, filters=(64, 128), accuracy=0.90),
            exp("broken", "4" * 40, failed=True),
            exp("old", "5" * 40),
        ],
    },
]


def test_leaderboard_sorted_with_blanks_and_seed_groups():
    rows = compare.leaderboard_rows(SHOW)
    names = [r["experiment"] for r in rows]
    assert names[:5] == ["wide", "seed-2", "seed-1", "broken (failed)", "old"]
    assert set(rows[0]) == {
        "experiment",
        "preset",
        "model.conv_filters",
        "seed",
        "test accuracy",
        "ROC AUC",
        "best epoch",
        "training time",
        "device",
    }  # train.epochs is the same for all: hidden
    assert rows[0]["test accuracy"] == "0.9000" and rows[0]["best epoch"] == "5 of 10"
    assert rows[0]["training time"] == "≈ 1 min 35 s" and rows[0]["device"] == "CPU"
    assert rows[3]["test accuracy"] == "" and rows[4]["ROC AUC"] == ""
    group = rows[5]
    assert group["experiment"] == "mean of seed-1, seed-2" and group["test accuracy"] == "0.7500 ± 0.0707 (n=2)"
    assert compare.leaderboard_rows(SHOW, ["wide"])[0]["experiment"] == "wide"
    with pytest.raises(KeyError, match="no such experiment: nope"):
        compare.leaderboard_rows(SHOW, ["nope"])


def test_no_experiments_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "exp_show", lambda repo, all_commits=False: SHOW[:1])
    assert compare.main(["-o", str(tmp_path / "c.html")]) == 0
    assert capsys.readouterr().out.strip() == compare.HOW_TO_MAKE_ONE and "dvc exp run -n" in compare.HOW_TO_MAKE_ONE
    assert not (tmp_path / "c.html").exists()
    assert compare.leaderboard_rows(SHOW[:1]) == [] and compare.HOW_TO_MAKE_ONE in compare.charts_markdown(SHOW[:1])


def test_charts_markdown_inlines_both_charts(tmp_path):
    markdown = compare.charts_markdown(SHOW, repo=tmp_path)
    assert markdown.count("](data:image/png;base64,") == 2


@needs_browser
def test_compare_page_opens_cleanly_in_a_browser(tmp_path):
    page = compare.compare(tmp_path, out=tmp_path / "compare.html", show=SHOW)
    seen = open_page(page, PAGE_FACTS)
    assert seen["console_errors"] == [] and seen["requests"] == []
    facts = seen["value"]
    assert facts["leaderboardRows"] == 5 and facts["groupRows"] == 1
    assert facts["images"] and all(i["complete"] and i["width"] > 0 for i in facts["images"])
