"""CHAIR ground truth for ShapesWorld: the object vocabulary with synonyms and the objects of each image.

``CHAIR_S`` = captions with >= 1 hallucinated object / captions; ``CHAIR_I`` = hallucinated mentions / all
mentions (REFERENCE.md). A mention is a word of :data:`CHAIR_SYNONYMS`; it is hallucinated when its class is
not among :func:`chair_ground_truth` of the image. The metric itself lives in ``taskmllm.eval``; this module
only states the ground truth, plus a reference implementation used by the data tests.
"""

from __future__ import annotations

from typing import Sequence

from taskmllm.data.sample import Sample
from taskmllm.data.vocab import CHAIR_SYNONYMS, mentioned_objects

__all__ = ["CHAIR_SYNONYMS", "mentioned_objects", "chair_ground_truth", "chair_counts"]


def chair_ground_truth(sample: Sample) -> set[str]:
    """The object classes present in a sample (for a video: in any frame)."""
    return {o.category for o in sample.objects}


def chair_counts(captions: Sequence[str], samples: Sequence[Sample]) -> dict[str, float]:
    """``CHAIR_S``, ``CHAIR_I``, recall and mean mention count of ``captions`` against ``samples``' objects."""
    hallucinated_caps = mentions = hallucinated = covered = total_gt = 0
    for caption, sample in zip(captions, samples, strict=True):
        gt = chair_ground_truth(sample)
        said = mentioned_objects(caption)
        bad = [c for c in said if c not in gt]
        hallucinated_caps += bool(bad)
        mentions += len(said)
        hallucinated += len(bad)
        covered += len(gt & set(said))
        total_gt += len(gt)
    n = max(1, len(captions))
    return {"CHAIR_S": hallucinated_caps / n, "CHAIR_I": hallucinated / max(1, mentions),
            "recall": covered / max(1, total_gt), "mentions": mentions / n}
