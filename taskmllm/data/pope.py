"""POPE-style yes/no object probing built from any samples' ground-truth objects and co-occurrence statistics.

For each image, ``k = min(per_image, #present, #absent)`` present classes (answer yes) and ``k`` absent
classes (answer no) are asked as ``"Is there a {shape} in the image?"``, so yes:no is exactly 1:1. Negatives:

- ``random``: ``k`` absent classes drawn uniformly;
- ``popular``: the ``k`` absent classes most frequent over the statistics' images;
- ``adversarial``: the ``k`` absent classes with the highest co-occurrence with the present ones,
  score(a) = sum over present classes p of #images holding both p and a.

Ties are broken by the class order of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from taskmllm.data.sample import Sample
from taskmllm.errors import ConfigError
from taskmllm.model.tokens import place_visual

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")


def pope_question(name: str) -> str:
    """The POPE question text about one class."""
    return f"Is there a {name} in the image?"


@dataclass(frozen=True)
class CooccurrenceStats:
    """Image-level co-occurrence counts of object classes.

    Attributes:
        classes: the class names, fixing the order of ``counts``.
        counts: ``(C, C)`` int: ``counts[i, j]`` images holding both class i and class j; the diagonal holds
            the number of images holding class i (its frequency).
        num_images: images counted.
    """

    classes: tuple[str, ...]
    counts: np.ndarray
    num_images: int

    @classmethod
    def from_samples(cls, samples: Iterable[Sample], classes: Sequence[str]) -> "CooccurrenceStats":
        """Count over the ground-truth objects of ``samples`` (classes outside ``classes`` are ignored)."""
        index = {c: i for i, c in enumerate(classes)}
        counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
        n = 0
        for s in samples:
            present = sorted({index[o.category] for o in s.objects if o.category in index})
            if present:
                counts[np.ix_(present, present)] += 1
            n += 1
        return cls(tuple(classes), counts, n)

    def frequency(self) -> np.ndarray:
        """``(C,)`` images per class."""
        return np.diag(self.counts).copy()

    def conditional(self, given: str, then: str) -> float:
        """Estimated P(``then`` present | ``given`` present)."""
        i, j = self.classes.index(given), self.classes.index(then)
        return float(self.counts[i, j] / max(1, self.counts[i, i]))


def negatives(present: Sequence[str], k: int, split: str, stats: CooccurrenceStats,
              rng: np.random.Generator) -> list[str]:
    """The ``k`` absent classes asked as negatives in ``split`` (see the module docstring)."""
    absent = [c for c in stats.classes if c not in set(present)]
    if split == "random":
        return [absent[i] for i in sorted(rng.choice(len(absent), size=k, replace=False))]
    idx = {c: i for i, c in enumerate(stats.classes)}
    if split == "popular":
        score = {a: int(stats.counts[idx[a], idx[a]]) for a in absent}
    elif split == "adversarial":
        score = {a: int(sum(stats.counts[idx[p], idx[a]] for p in present if p in idx)) for a in absent}
    else:
        raise ConfigError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    return sorted(absent, key=lambda a: (-score[a], idx[a]))[:k]


def pope_samples(scenes: Iterable[Sample], split: str, stats: CooccurrenceStats, per_image: int = 3,
                 seed: int = 0, question_first: Optional[bool] = True) -> list[Sample]:
    """POPE samples of ``split``: one yes/no turn each, ``task="pope"``, 1:1 yes:no per image.

    ``question_first``: the question before (True) or after (False) the ``<image>`` placeholder; None: no
    placeholder (the model's processor places it by its ``tokens.image_first``).

    Each sample's ``meta`` holds ``pope_split``, ``object`` and ``label`` (``"yes"`` / ``"no"``).
    """
    if split not in POPE_SPLITS:
        raise ConfigError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    out: list[Sample] = []
    for scene in scenes:
        present = sorted({o.category for o in scene.objects if o.category in stats.classes},
                         key=stats.classes.index)
        k = min(per_image, len(present), len(stats.classes) - len(present))
        if k == 0:
            continue
        pos = [present[i] for i in sorted(rng.choice(len(present), size=k, replace=False))]
        neg = negatives(present, k, split, stats, rng)
        for label, names in (("yes", pos), ("no", neg)):
            for name in names:
                question = pope_question(name)
                if question_first is not None:
                    question = place_visual(question, image_first=not question_first)
                turn = (question, "Yes." if label == "yes" else "No.")
                s = scene.with_turns("pope", [turn], [], f"pope/{split}/{name}")
                s.meta.update(pope_split=split, object=name, label=label)
                out.append(s)
    return out
