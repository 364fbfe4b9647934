"""POPE splits: 1:1 yes/no, correct labels, and negatives chosen as the protocol says (independent counts)."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations

import pytest

from taskmllm.data.pope import CooccurrenceStats, pope_samples
from taskmllm.data.sample import ObjectGT, Sample
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.data.shapesworld.vocab import SHAPES

WORLD = ShapesWorld(WorldConfig(image_size=64), seed=21)
TRAIN = [WORLD.image(i, "train") for i in range(250)]
EVAL = [WORLD.image(i, "val") for i in range(40)]


def _independent_counts():
    pair, single = Counter(), Counter()
    for s in TRAIN:
        classes = sorted({o.category for o in s.objects})
        single.update(classes)
        pair.update(combinations(classes, 2))
    return pair, single


def _by_image(samples):
    groups = {}
    for s in samples:
        obj = re.fullmatch(r"Is there a (\w+) in the image\?\n<image>", s.turns[0][0]).group(1)
        assert obj == s.meta["object"]
        groups.setdefault(s.meta["index"], []).append((obj, s.turns[0][1]))
    return groups


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_split(split):
    stats = CooccurrenceStats.from_samples(TRAIN, SHAPES)
    samples = pope_samples(EVAL, split, stats, per_image=3, seed=0)
    answers = Counter(s.turns[0][1] for s in samples)
    assert answers["Yes."] == answers["No."] > 0 and set(answers) == {"Yes.", "No."}
    pair, single = _independent_counts()
    scenes = {s.meta["index"]: s for s in EVAL}
    for idx, qa in _by_image(samples).items():
        present = {o.category for o in scenes[idx].objects}
        yes = [o for o, a in qa if a == "Yes."]
        no = [o for o, a in qa if a == "No."]
        assert set(yes) <= present and not set(no) & present and len(yes) == len(no)
        absent = [c for c in SHAPES if c not in present]
        if split == "adversarial":
            score = {a: sum(pair[tuple(sorted((a, p)))] for p in present) for a in absent}
        elif split == "popular":
            score = {a: single[a] for a in absent}
        else:
            continue
        top = sorted((score[a] for a in absent), reverse=True)[:len(no)]
        assert sorted((score[a] for a in no), reverse=True) == top


def test_adversarial_negatives_follow_the_prior():
    """With the default star->heart prior, heart is the adversarial negative of an image holding only a star."""
    stats = CooccurrenceStats.from_samples(TRAIN, SHAPES)
    assert stats.conditional("star", "heart") > 0.6
    only_star = [Sample(id=f"s{i}", source="test", objects=[ObjectGT(id=0, category="star")],
                        meta={"index": i}) for i in range(3)]
    samples = pope_samples(only_star, "adversarial", stats, per_image=1)
    assert [s.meta["object"] for s in samples if s.meta["label"] == "no"] == ["heart"] * 3
    assert [s.meta["object"] for s in samples if s.meta["label"] == "yes"] == ["star"] * 3
