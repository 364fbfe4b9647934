"""CHAIR ground truth: the objects of each image, and a reference count over captions.

``CHAIR_S`` = captions with >= 1 hallucinated object / captions; ``CHAIR_I`` = hallucinated mentions / all
mentions (REFERENCE.md). A mention is a word a source's vocabulary maps to an object class (``mentioned``: text ->
classes, one per mention, e.g. ShapesWorld's :func:`~taskmllm.data.shapesworld.vocab.mentioned_objects`); it is
hallucinated when its class is not among :func:`chair_ground_truth` of the image. The metric itself lives in
``taskmllm.eval``; this module states the ground truth, plus a reference implementation used by the data tests.
"""

from __future__ import annotations

from typing import Callable, Sequence

from taskmllm.data.sample import Sample

__all__ = ["chair_counts", "chair_ground_truth"]


def chair_ground_truth(sample: Sample) -> set[str]:
    """The object classes present in a sample (for a video: in any frame)."""
    return {o.category for o in sample.objects}


def chair_counts(captions: Sequence[str], samples: Sequence[Sample],
                 mentioned: Callable[[str], list[str]]) -> dict[str, float]:
    """``CHAIR_S``, ``CHAIR_I``, recall and mean mention count of ``captions`` against ``samples``' objects;
    ``mentioned(caption)`` lists the classes a caption mentions, one entry per mention."""
    hallucinated_caps = mentions = hallucinated = covered = total_gt = 0
    for caption, sample in zip(captions, samples, strict=True):
        gt = chair_ground_truth(sample)
        said = mentioned(caption)
        bad = [c for c in said if c not in gt]
        hallucinated_caps += bool(bad)
        mentions += len(said)
        hallucinated += len(bad)
        covered += len(gt & set(said))
        total_gt += len(gt)
    n = max(1, len(captions))
    return {"CHAIR_S": hallucinated_caps / n, "CHAIR_I": hallucinated / max(1, mentions),
            "recall": covered / max(1, total_gt), "mentions": mentions / n}
