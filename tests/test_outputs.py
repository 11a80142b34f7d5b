"""staged_dir: outputs appear whole or not at all."""

from __future__ import annotations

import pytest

from convnets.outputs import staged_dir, write_json


def test_success_replaces_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_dir(final) as tmp:
        assert tmp != final and tmp.parent == final.parent
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # readers still see the old output meanwhile
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_keeps_previous_output_and_cleans_up(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash mid-stage")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_without_previous_output_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(tmp_path / "out"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_readable_and_sorted(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": {"c": 2.5}})
    assert (tmp_path / "m.json").read_text().splitlines()[1].strip() == '"a": {'
    assert not list(tmp_path.glob(".*partial"))
