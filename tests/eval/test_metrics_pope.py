"""POPE parsing (LLaVA's eval_pope.py rule) and scores on hand-made transcripts."""

from __future__ import annotations

import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.hallucination import pope_metrics, pope_parse, pope_summary


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is no dog in the image.", "no"),
        ("I do not see a cat.", "no"),
        ("Yes. There is no cat next to it.", "yes"),   # only the first sentence counts
        ("no", "no"),
        ("No,", "no"),                                  # commas are removed before splitting
        ("", "yes"),                                    # nothing said -> yes (LLaVA's default)
        ("Nothing like that.", "yes"),                  # words must match exactly
        ("Not at all.", "yes"),                         # 'Not' is not one of 'No' / 'not' / 'no'
        ("NO", "yes"),                                  # the official rule does not lowercase
        ("No\nthere is none", "yes"),                   # split on ' ' only: the word is 'No\nthere'
        ("There is a cat, no dog.", "no"),
    ],
)
def test_parse_follows_llava_rule(text: str, parsed: str) -> None:
    assert pope_parse(text) == parsed


def test_lowercase_variant_is_opt_in() -> None:
    assert pope_parse("NO") == "yes"
    assert pope_parse("NO", lowercase=True) == "no"
    assert pope_parse("Not at all.", lowercase=True) == "no"


def test_always_yes_on_balanced_split() -> None:
    labels = ["yes"] * 50 + ["no"] * 50
    out = pope_metrics(["Yes, there is."] * 100, labels)
    # TP 50, FP 50: precision 0.5, recall 1 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3 (66.7 %), accuracy 0.5
    assert out["f1"] == pytest.approx(2 / 3)
    assert round(100 * out["f1"], 1) == 66.7
    assert out["yes_ratio"] == 1.0
    assert out["accuracy"] == 0.5 and out["precision"] == 0.5 and out["recall"] == 1.0


def test_hand_made_transcript() -> None:
    labels = ["yes", "yes", "yes", "no", "no"]
    answers = ["Yes, there is a red circle.",        # TP
               "No, there is not.",                   # FN
               "There is a circle in the image.",     # TP (no negative word)
               "Yes.",                                # FP
               "There is no triangle."]               # TN
    out = pope_metrics(answers, labels)
    assert (out["tp"], out["fn"], out["fp"], out["tn"]) == (2, 1, 1, 1)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(3 / 5)


def test_always_no_has_zero_precision_without_crashing() -> None:
    out = pope_metrics(["No."] * 4, [True, True, False, False])
    assert out["precision"] == 0.0 and out["f1"] == 0.0 and out["yes_ratio"] == 0.0
    assert out["accuracy"] == 0.5


def test_summary_means_over_splits() -> None:
    labels = ["yes", "no"]
    out = pope_summary({
        "random": (["Yes", "No"], labels),        # perfect: F1 1
        "popular": (["Yes", "Yes"], labels),      # P 1/2, R 1 -> F1 2/3
        "adversarial": (["No", "Yes"], labels),   # TP 0 -> F1 0
    })
    assert out["splits"]["random"]["f1"] == 1.0
    assert out["mean_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["mean_yes_ratio"] == pytest.approx((0.5 + 1 + 0.5) / 3)


def test_bad_input() -> None:
    with pytest.raises(MetricInputError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(MetricInputError, match="label"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(MetricInputError, match="string"):
        pope_metrics([None], ["yes"])  # type: ignore[list-item]
    with pytest.raises(MetricInputError, match="empty"):
        pope_metrics([], [])
    with pytest.raises(MetricInputError):
        pope_summary({})
