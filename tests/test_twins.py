"""The edited-twin diagnostic set (retrieval/twins.py)."""

import pytest

from retrieval.twins import KINDS, Twin, action_twin, colour_twin, make_twins, number_twin, preference_table, swap_twin


def test_each_rule_changes_one_thing():
    assert colour_twin("A brown dog runs on the sand .") == "A red dog runs on the sand ."
    assert colour_twin("Black dog in the snow") == "White dog in the snow"  # the capital is kept
    assert colour_twin("A black man in a red shirt") == "A black man in a blue shirt"  # not a person's colour
    assert number_twin("Two dogs play .") == "Three dogs play ."
    assert swap_twin("A dog chases a boy across the yard") == "A boy chases a dog across the yard"
    assert action_twin("A girl is running on the beach") == "A girl is sleeping on the beach"


def test_no_twin_when_no_rule_fits():
    assert colour_twin("A dog runs") is None
    assert number_twin("A dog runs") is None
    assert swap_twin("A dog runs after another dog") is None  # the same participant twice
    assert action_twin("A dog runs") is None


def test_make_twins_one_per_photo_and_kind():
    captions = [["A dog runs", "Two black dogs are running"], ["A man walks a dog"], ["The sky"]]
    twins = make_twins(captions)
    assert {(t.image, t.kind) for t in twins} == {(0, "colour"), (0, "number"), (0, "action"), (1, "swap")}
    assert all(t.original != t.edited for t in twins)
    assert len(make_twins(captions * 10, per_kind=3)) == 3 + 3 + 3 + 3


def test_preference_table():
    twins = [Twin(0, "colour", "a", "b"), Twin(1, "colour", "a", "b"), Twin(2, "swap", "a", "b")]
    table = preference_table(twins, {"recall": [0.1, -0.2, 0.0], "reranker": [1.0, 2.0, 3.0]})
    assert table["recall"] == {"colour": 50.0, "swap": 0.0, "all": pytest.approx(33.3)}  # a tie is not right
    assert table["reranker"]["all"] == 100.0
    assert set(table["recall"]) <= set(KINDS) | {"all"}
    with pytest.raises(ValueError):
        preference_table(twins, {"short": [1.0]})
