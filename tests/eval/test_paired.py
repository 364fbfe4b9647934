"""taskmllm.eval.paired (the hallucination benchmark's statistics): metrics from per-image counts equal
``pope_metrics`` / ``chair`` on the same answers (the oracle), a resample is a weighting of images, and the paired
bootstrap's interval behaves as hand-computed cases say."""

from __future__ import annotations

import numpy as np
import pytest

from taskmllm.eval.hallucination import ChairVocabulary, chair, pope_metrics
from taskmllm.eval.paired import (WorldCounts, chair_counts, mean_over_worlds, paired_bootstrap, pope_counts,
                                  pope_from_counts)

VOCAB = ChairVocabulary.from_synonyms({"circle": ["ring"], "square": [], "star": []})
ANSWERS = ["Yes.", "No, there is not.", "Yes", "no", "Yes, a star.", "No."]
LABELS = ["yes", "yes", "no", "no", "yes", "no"]
IMAGES = [0, 0, 1, 1, 2, 2]
CAPTIONS = ["A ring and a square.", "Two stars.", "A circle, a circle and a star."]
GT = [{"circle"}, {"square"}, {"circle", "star"}]


def _world(answers=ANSWERS, captions=CAPTIONS) -> WorldCounts:
    pope = pope_counts(answers, LABELS, IMAGES, 3)
    return WorldCounts({"random": pope, "popular": pope, "adversarial": pope}, chair_counts(captions, GT, VOCAB))


def test_counts_give_the_official_metrics():
    m = _world().metrics()
    want = pope_metrics(ANSWERS, LABELS)
    for key in ("accuracy", "f1", "yes_ratio"):
        assert float(m[f"random_{key}"]) == pytest.approx(want[key]) == pytest.approx(float(m[f"mean_{key}"]))
    want = chair(CAPTIONS, GT, VOCAB)
    for key in ("chair_s", "chair_i", "recall", "mean_length"):
        assert float(m[key]) == pytest.approx(want[key])
    assert pope_from_counts(np.zeros(5))["f1"] == 0.0, "undefined precision counts as 0, as pope_metrics does"


def test_a_resample_is_a_weighting_of_images():
    w = np.array([[2, 0, 1]])  # image 0 twice, image 2 once
    m = _world().metrics(w)
    pick = [0, 1, 0, 1, 4, 5]  # image 0's questions twice, image 2's once
    want = pope_metrics([ANSWERS[i] for i in pick], [LABELS[i] for i in pick])
    assert float(m["random_accuracy"][0]) == pytest.approx(want["accuracy"])
    want = chair([CAPTIONS[0], CAPTIONS[0], CAPTIONS[2]], [GT[0], GT[0], GT[2]], VOCAB)
    assert float(m["chair_i"][0]) == pytest.approx(want["chair_i"]) and float(m["recall"][0]) == want["recall"]


def test_paired_bootstrap_intervals():
    base = [_world(), _world()]
    same = paired_bootstrap(base, base, resamples=200)
    assert all(d["diff"] == 0 and d["lo"] == d["hi"] == 0 and not d["excludes_zero"] for d in same.values())
    right = [{"yes": "Yes.", "no": "No."}[label] for label in LABELS]
    better = [_world(answers=right, captions=["A circle.", "A square.", "A circle and a star."])] * 2
    res = paired_bootstrap(better, base, resamples=500, seed=1)
    assert res["mean_accuracy"]["diff"] == pytest.approx(1.0 - pope_metrics(ANSWERS, LABELS)["accuracy"])
    assert res["mean_accuracy"]["lo"] > 0 and res["mean_accuracy"]["excludes_zero"]
    assert res["chair_s"]["diff"] == pytest.approx(-chair(CAPTIONS, GT, VOCAB)["chair_s"])
    assert res["chair_s"]["lo"] <= res["chair_s"]["diff"] <= res["chair_s"]["hi"] < 0
    assert mean_over_worlds(better)["recall"] == pytest.approx(1.0)
