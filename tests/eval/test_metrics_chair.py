"""CHAIR with a synonym vocabulary on hand-made captions."""

from __future__ import annotations

import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.hallucination import ChairVocabulary, chair, simple_plural

VOCAB = {
    "circle": ["ring"],
    "square": ["box"],
    "triangle": [],
    "traffic light": ["stoplight"],
    "light": ["lamp"],
}


def test_plurals() -> None:
    assert simple_plural("circle") == "circles"
    assert simple_plural("box") == "boxes"
    assert simple_plural("sky") == "skies"
    assert simple_plural("traffic light") == "traffic lights"


def test_extract_longest_first_word_boundaries_and_plurals() -> None:
    vocab = ChairVocabulary.from_synonyms(VOCAB)
    assert vocab.extract("A traffic light and a lamp.") == ["traffic light", "light"]  # not "light" twice
    assert vocab.extract("Two Traffic   Lights") == ["traffic light"]  # case and whitespace insensitive
    assert vocab.extract("The boxer rings the bell") == ["circle"]  # "boxer" is not "box"; "rings" -> ring
    assert vocab.extract("red-circle, squares; STOPLIGHT") == ["circle", "square", "traffic light"]
    assert vocab.extract("triangular circled") == []


def test_chair_on_hand_made_captions() -> None:
    captions = [
        "A red circle and two blue boxes.",                 # circle, square: both present
        "A ring next to a triangle and a traffic light.",   # circle ok; triangle, traffic light hallucinated
        "Circles, circles everywhere; a lamp.",             # circle, circle, light: all present
        "The boxer and the triangular squares.",            # square hallucinated; triangle not mentioned
    ]
    gt = [{"circle", "square"}, {"circle"}, {"circle", "light"}, {"triangle"}]
    out = chair(captions, gt, VOCAB)
    # captions with >= 1 hallucination: #2 and #4 -> 2/4
    assert out["chair_s"] == pytest.approx(2 / 4)
    # mentions 2 + 3 + 3 + 1 = 9, hallucinated 2 + 1 = 3 -> 1/3
    assert out["n_mentions"] == 9 and out["n_hallucinated_mentions"] == 3
    assert out["chair_i"] == pytest.approx(3 / 9)
    # ground-truth objects 2 + 1 + 2 + 1 = 6, mentioned 2 + 1 + 2 + 0 = 5
    assert out["recall"] == pytest.approx(5 / 6)
    # words (whitespace split): 7 + 10 + 5 + 6 = 28 over 4 captions
    assert out["mean_length"] == pytest.approx(7.0)
    assert out["per_caption"][1]["hallucinated"] == ["triangle", "traffic light"]


def test_no_mentions() -> None:
    out = chair(["Nothing to see."], [["circle"]], VOCAB)
    assert out["chair_s"] == 0.0 and out["chair_i"] == 0.0 and out["recall"] == 0.0


def test_explicit_synonym_wins_over_generated_plural() -> None:
    vocab = ChairVocabulary.from_synonyms({"glass": [], "spectacles": ["glasses"]})
    assert vocab.extract("glasses") == ["spectacles"]
    assert vocab.extract("a glass") == ["glass"]


def test_bad_input() -> None:
    with pytest.raises(MetricInputError, match="names both"):
        ChairVocabulary.from_synonyms({"circle": ["ring"], "donut": ["ring"]})
    with pytest.raises(MetricInputError, match="not in the vocabulary"):
        chair(["a circle"], [["hexagon"]], VOCAB)
    with pytest.raises(MetricInputError):
        chair(["a circle", "a square"], [["circle"]], VOCAB)
    with pytest.raises(MetricInputError, match="list of strings"):
        ChairVocabulary.from_synonyms({"circle": "ring"})
    with pytest.raises(MetricInputError, match="empty"):
        ChairVocabulary.from_synonyms({})
