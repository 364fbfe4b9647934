"""VQA exact match with normalization."""

from __future__ import annotations

import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("Two.", "2"), ("  RED  ", "red"), ("dark   blue!", "dark blue"), ("2", "2"), ("twenty", "20"),
     ("yes?!", "yes"), ("three circles", "3 circles"), ("", "")],
)
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_accuracy_hand_computed() -> None:
    preds = ["Two", "Red.", "there are two", "yes", "Blue"]
    refs = ["2", "red", "2", ["Yes", "yeah"], "green"]
    # hits: "two"=="2", "red"=="red", miss (not exact), "yes" in {"yes","yeah"}, miss -> 3/5
    out = vqa_accuracy(preds, refs, question_types=["count", "color", "count", "existence", "color"])
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["correct"] == 3 and out["n"] == 5
    assert out["by_type"]["count"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert out["by_type"]["color"]["accuracy"] == 0.5
    assert out["by_type"]["existence"]["accuracy"] == 1.0


def test_bad_input() -> None:
    with pytest.raises(MetricInputError):
        vqa_accuracy(["a"], ["a", "b"])
    with pytest.raises(MetricInputError, match="empty list"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(MetricInputError):
        vqa_accuracy([], [])
    with pytest.raises(MetricInputError):
        vqa_accuracy(["a"], ["a"], question_types=[])
