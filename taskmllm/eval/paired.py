"""POPE and CHAIR from per-image counts, and a paired bootstrap of one method's difference from another.

Each image contributes counts (POPE per split: ``tp, fp, tn, fn, questions``; CHAIR: ``hallucinated caption, object
mentions, hallucinated mentions, ground-truth objects, ground-truth objects mentioned, words, captions``); a metric
is a function of the counts summed over images, exactly as :func:`~taskmllm.eval.hallucination.pope_metrics` and
:func:`~taskmllm.eval.hallucination.chair` compute it from the answers (POPE's "precision undefined" cases are 0).
Summing with integer weights per image is a bootstrap resample, so every resample of every method is a matrix
product.

:func:`paired_bootstrap`: the unit resampled is the **image** (its POPE questions of all three splits and its
caption stay together), drawn with replacement within each evaluation world (seed); both methods are scored on the
same resampled images (paired), the statistic is the mean over worlds of each world's metric (the benchmark's
headline), and the interval is the 2.5-97.5 percentile of the method-minus-baseline differences.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from taskmllm.errors import MetricInputError
from taskmllm.eval.hallucination import ChairVocabulary, pope_parse

POPE_COUNTS = ("tp", "fp", "tn", "fn", "n")
CHAIR_COUNTS = ("hallucinated_caption", "mentions", "hallucinated_mentions", "gt_objects", "gt_found", "words",
                "captions")
POPE_METRICS = ("accuracy", "f1", "yes_ratio")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "mean_length")


def pope_counts(answers: Sequence[str], labels: Sequence[str], images: Sequence[int], n_images: int) -> np.ndarray:
    """``(n_images, 5)`` per-image ``tp, fp, tn, fn, n`` of POPE answers (LLaVA's parse) against yes/no labels;
    ``images[i]`` is the image question ``i`` is about."""
    if not len(answers) == len(labels) == len(images):
        raise MetricInputError(f"{len(answers)} answers, {len(labels)} labels, {len(images)} image indices")
    out = np.zeros((n_images, len(POPE_COUNTS)), np.int64)
    for answer, label, image in zip(answers, labels, images):
        yes, truth = pope_parse(answer) == "yes", str(label).strip().lower() == "yes"
        out[int(image), [0 if yes and truth else 1 if yes else 3 if truth else 2, 4]] += 1
    return out


def chair_counts(captions: Sequence[str], gt_objects: Sequence[Collection[str]],
                 vocabulary: ChairVocabulary) -> np.ndarray:
    """``(n, 7)`` per-caption CHAIR counts (:data:`CHAIR_COUNTS`), one caption per image."""
    if len(captions) != len(gt_objects):
        raise MetricInputError(f"{len(captions)} captions but {len(gt_objects)} ground-truth sets")
    rows = []
    for caption, present in zip(captions, gt_objects):
        gt = set(present)
        mentioned = vocabulary.extract(caption)
        hallucinated = [m for m in mentioned if m not in gt]
        rows.append([bool(hallucinated), len(mentioned), len(hallucinated), len(gt), len(gt & set(mentioned)),
                     len(caption.split()), 1])
    return np.asarray(rows, np.int64).reshape(-1, len(CHAIR_COUNTS))


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def pope_from_counts(sums: np.ndarray) -> dict[str, np.ndarray]:
    """``(..., 5)`` summed counts -> accuracy, precision, recall, f1, yes_ratio (each ``(...)``)."""
    tp, fp, tn, fn, n = np.moveaxis(np.asarray(sums, np.float64), -1, 0)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return {"accuracy": _div(tp + tn, n), "precision": precision, "recall": recall,
            "f1": _div(2 * precision * recall, precision + recall), "yes_ratio": _div(tp + fp, n)}


def chair_from_counts(sums: np.ndarray) -> dict[str, np.ndarray]:
    """``(..., 7)`` summed counts -> chair_s, chair_i, recall, mean_length (each ``(...)``)."""
    flag, mentions, halluc, gt, found, words, caps = np.moveaxis(np.asarray(sums, np.float64), -1, 0)
    return {"chair_s": _div(flag, caps), "chair_i": _div(halluc, mentions), "recall": _div(found, gt),
            "mean_length": _div(words, caps)}


@dataclass
class WorldCounts:
    """One evaluation world's per-image counts: ``pope`` ``{split: (n_images, 5)}`` and ``chair`` ``(n_images, 7)``
    (the same images, in the same order)."""

    pope: Mapping[str, np.ndarray]
    chair: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.chair.shape[0])

    def metrics(self, weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """Every metric (``{split}_accuracy|f1|yes_ratio``, ``mean_*`` over splits, CHAIR's), for image weights
        ``(B, n_images)`` (a resample each; None = every image once: arrays of shape ``()``)."""
        w = np.ones(self.n_images, np.int64) if weights is None else np.asarray(weights)
        out: dict[str, np.ndarray] = {}
        for split, counts in self.pope.items():
            if counts.shape[0] != self.n_images:
                raise MetricInputError(f"POPE {split}: {counts.shape[0]} images, CHAIR: {self.n_images}")
            scores = pope_from_counts(w @ counts)
            out.update({f"{split}_{k}": scores[k] for k in POPE_METRICS})
        for k in POPE_METRICS:
            out[f"mean_{k}"] = np.mean([out[f"{s}_{k}"] for s in self.pope], axis=0)
        out.update({k: v for k, v in chair_from_counts(w @ self.chair).items() if k in CHAIR_METRICS})
        return out


def mean_over_worlds(worlds: Sequence[WorldCounts], weights: Optional[Sequence[np.ndarray]] = None
                     ) -> dict[str, np.ndarray]:
    """Each metric averaged over the worlds (per resample when ``weights``, one ``(B, n_images)`` per world)."""
    per = [w.metrics(None if weights is None else weights[i]) for i, w in enumerate(worlds)]
    return {k: np.mean([p[k] for p in per], axis=0) for k in per[0]}


def paired_bootstrap(method: Sequence[WorldCounts], baseline: Sequence[WorldCounts], resamples: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric: the difference ``method - baseline`` of the means over worlds and its paired bootstrap 95%
    interval (images resampled within each world, the same images for both).

    Returns:
        ``{metric: {"diff", "lo", "hi", "excludes_zero"}}``.
    """
    if len(method) != len(baseline) or not method:
        raise MetricInputError(f"{len(method)} worlds for the method, {len(baseline)} for the baseline")
    rng = np.random.default_rng(seed)
    weights = []
    for a, b in zip(method, baseline):
        if a.n_images != b.n_images:
            raise MetricInputError(f"paired worlds differ in size: {a.n_images} vs {b.n_images} images")
        weights.append(rng.multinomial(a.n_images, np.full(a.n_images, 1.0 / a.n_images), size=resamples))
    observed = {k: float(v) for k, v in mean_over_worlds(method).items()}
    base = mean_over_worlds(baseline)
    boot_m, boot_b = mean_over_worlds(method, weights), mean_over_worlds(baseline, weights)
    out = {}
    for key in observed:
        diffs = boot_m[key] - boot_b[key]
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        out[key] = {"diff": observed[key] - float(base[key]), "lo": float(lo), "hi": float(hi),
                    "excludes_zero": bool(lo > 0 or hi < 0)}
    return out
