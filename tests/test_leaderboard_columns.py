"""The leaderboards lead with their figures, then the params that differ, shortened.

A dogs-vs-cats experiment carries an absolute archive path and its sha256: shown whole and
first, they pushed the test accuracy off a 1400 px screen (compare.html, and the one leaderboard of
the Prefect `dvc-leaderboard` table and the sweep's terminal, which are compare's rows).
"""

from __future__ import annotations

import os
import re

import pytest
from browser import INSTALL_HINT, chromium, open_page

from convnets import compare
from pipeline import results
from pipeline.grid import Point

FIGURES = ["experiment", "test accuracy", "ROC AUC", "best epoch", "training time"]
SHA_A = "e1c360618467dcbd782242a99736d0656aa3a124f63cff8ea62b3a18acd792de"
SHA_B = "0f3a9c2b5d7e41a8c6b0e2f4a1d3c5e7f9b1a3c5e7d9f1b3a5c7e9f1d3b5a7c9"
ARCHIVE_A = "/home/someone/projects/shared/data/dogs-vs-cats-128/dogs-vs-cats.zip"
ARCHIVE_B = "/home/someone/projects/shared/data/dogs-vs-cats-180/kaggle-train.zip"


def experiment(name, rev, archive, sha, accuracy, seed=42):
    test = {"accuracy": accuracy, "roc_auc": accuracy + 0.05}
    return {
        "executor": None,
        "name": name,
        "revs": [
            {
                "rev": rev,
                "name": name,
                "error": None,
                "data": {
                    "params": {
                        "params.yaml": {
                            "data": {
                                "seed": seed,
                                "fetch": {"source": "archive", "archive": archive, "archive_sha256": sha},
                                "train": {"epochs": 10},
                            }
                        }
                    },
                    "metrics": {
                        "data/eval/metrics.json": {"data": {"test": test}},
                        "data/train/metrics.json": {"data": {"step": 9, "best": {"epoch": 4}}},
                        "timings/train.json": {"data": {"seconds": 95.0}},
                    },
                },
            }
        ],
    }


def show(*experiments) -> list:
    return [
        {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
        {"rev": "c" * 40, "name": "main", "data": {}, "error": None, "experiments": list(experiments)},
    ]


DOGS = show(
    experiment("at-128", "1" * 40, ARCHIVE_A, SHA_A, 0.70),
    experiment("at-180", "2" * 40, ARCHIVE_B, SHA_B, 0.80),
)


def test_the_figures_come_first_then_the_params_that_differ_shortened():
    experiments = compare.experiments_from_show(DOGS)
    columns, rows = compare.leaderboard(experiments)
    assert columns[:5] == FIGURES
    assert columns.index("fetch.archive") > columns.index("training time")
    assert "train.epochs" not in columns  # the same for both: hidden, as before
    assert [r["experiment"] for r in rows] == ["at-180", "at-128"]
    assert rows[0]["fetch.archive"] == "kaggle-train.zip" and rows[1]["fetch.archive"] == "dogs-vs-cats.zip"
    assert rows[0]["fetch.archive_sha256"] == SHA_B[:8] and rows[1]["fetch.archive_sha256"] == SHA_A[:8]
    # the Prefect table keeps the columns in the rows' key order
    prefect = compare.leaderboard_rows(DOGS)
    assert list(prefect[0])[:5] == FIGURES and prefect[0]["test accuracy"] == "0.8000"


def test_shortening_keeps_values_that_differ_apart():
    same_name = show(
        experiment("a", "1" * 40, "/data/one/dogs-vs-cats.zip", SHA_A, 0.7),
        experiment("b", "2" * 40, "/data/two/dogs-vs-cats.zip", SHA_A[:8] + SHA_B[8:], 0.8),
    )
    _, rows = compare.leaderboard(compare.experiments_from_show(same_name))
    assert {r["fetch.archive"] for r in rows} == {"one/dogs-vs-cats.zip", "two/dogs-vs-cats.zip"}
    assert {r["fetch.archive_sha256"] for r in rows} == {SHA_A[:16], SHA_A[:8] + SHA_B[8:16]}  # 8 alike: 16
    assert compare.short_forms(["x/a.zip", "y/a.zip", "y/a.zip"]) == ["x/a.zip", "y/a.zip", "y/a.zip"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (ARCHIVE_A, "dogs-vs-cats.zip"),
        ("../shared/data/dogs-vs-cats.zip", "dogs-vs-cats.zip"),
        ("https://example.org/files/cats.tar.gz", "cats.tar.gz"),
        ("C:\\data\\dogs.zip", "dogs.zip"),
        (SHA_A, "e1c36061"),
        ("abc123", "abc123"),  # too short to be a digest
        ("imagenet", "imagenet"),
        ([32, 64], "[32, 64]"),
        (0.001, "0.001"),
    ],
)
def test_a_path_shows_its_file_name_and_a_hash_8_characters(value, shown):
    assert compare.shorten(value) == shown


def test_compare_page_leads_with_the_figures_and_keeps_the_whole_value_on_hover(tmp_path):
    page = compare.compare(tmp_path, out=tmp_path / "compare.html", show=DOGS).read_text()
    board = page[page.index('<table class="leaderboard">') :]
    board = board[: board.index("</table>")]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", board)
    assert headers[:5] == FIGURES and headers.index("fetch.archive") > 4
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", board)
    assert "dogs-vs-cats.zip" in cells and ARCHIVE_A not in cells and SHA_A[:8] in cells
    assert f'title="{ARCHIVE_A}">dogs-vs-cats.zip<' in board and f'title="{SHA_A}">{SHA_A[:8]}<' in board


def test_the_sweep_table_is_compares_with_the_sweeps_columns_after_it():
    outcomes = [
        results.Outcome(Point((f"fetch.archive={archive}",), name), status="done", host="gpu-1", seconds=600.0)
        for name, archive in (("at-128", ARCHIVE_A), ("at-180", ARCHIVE_B))
    ]
    outcomes.append(results.Outcome(Point(("+experiment=scratch",), "plain"), status="failed", message="boom"))
    board = compare.board(DOGS, ["at-128", "at-180"])
    rows = results.leaderboard(board.columns, board.rows, results.point_rows(outcomes))
    assert list(rows[0]) == [*board.columns, "status", "worker", "attempts", "wall time"]
    assert list(rows[0])[:5] == FIGURES and [{c: r[c] for c in board.columns} for r in rows[:2]] == board.rows
    assert [r["experiment"] for r in rows] == ["at-180", "at-128", "plain"]
    assert rows[0]["fetch.archive"] == "kaggle-train.zip" and rows[0]["wall time"] == "10m 00s"
    assert rows[2]["status"] == "failed: boom" and rows[2]["fetch.archive"] == ""
    table = results.text_table(rows)
    header = table.splitlines()[0]
    assert header.index("test accuracy") < header.index("fetch.archive") < header.index("status")
    assert ARCHIVE_A not in table and SHA_A not in table


def test_shortening_keeps_what_tells_values_apart():
    assert compare.short_forms(["/a/x.zip", "/b/x.zip"]) == ["a/x.zip", "b/x.zip"]
    assert compare.shorten("/data") == "data" and compare.shorten("/a/x.zip", 1) == "a/x.zip"
    assert compare.shorten("/a/x.zip", 2) == "/a/x.zip"  # whole, at last


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason=INSTALL_HINT)
def test_test_accuracy_is_on_a_1400_px_screen_next_to_a_long_archive_path(tmp_path):
    page = compare.compare(tmp_path, out=tmp_path / "compare.html", show=DOGS)
    where = """(() => Array.from(document.querySelectorAll('table.leaderboard th')).map(th => {
      const box = th.getBoundingClientRect();
      return {name: th.textContent, right: box.right};
    }))()"""
    seen = open_page(page, where, width=1400)
    right = {h["name"]: h["right"] for h in seen["value"]}
    assert all(right[name] <= 1400 for name in FIGURES), right
