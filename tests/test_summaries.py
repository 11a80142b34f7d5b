"""docs/experiments.md shows every preset's model.summary() as the presets and the builder make it now."""

from __future__ import annotations

from convnets import summaries


def test_the_documented_summaries_are_current():
    documented = summaries.current(summaries.DOC.read_text())
    assert documented == summaries.render(), "docs/experiments.md is out of date: run python -m convnets.summaries"


def test_every_preset_is_documented():
    documented = summaries.current(summaries.DOC.read_text())
    assert [f"### {name}\n" in documented for name in summaries.presets()] == [True] * len(summaries.presets())
