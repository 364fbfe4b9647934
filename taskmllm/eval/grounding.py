"""Grounding metrics: referring segmentation (cIoU, gIoU), REC Acc@0.5 and temporal grounding R@1.

All results are fractions in ``[0, 1]`` (multiply by 100 for the percentages papers print).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import (
    as_boxes,
    as_float_array,
    box_iou_pairwise,
    check_same_length,
    interval_iou,
    mask_iou,
)

__all__ = ["REC_IOU_THRESHOLD", "TEMPORAL_IOU_THRESHOLDS", "rec_accuracy", "referring_segmentation",
           "temporal_grounding"]

#: A REC prediction is correct when its IoU with the target box is strictly greater than this.
REC_IOU_THRESHOLD = 0.5

#: IoU thresholds of temporal-grounding recall (Charades-STA convention).
TEMPORAL_IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)


def _require_nonempty(name: str, n: int) -> None:
    if n == 0:
        raise MetricInputError(f"{name} is empty; a metric over zero samples is undefined")


def referring_segmentation(pred_masks: Sequence[ArrayLike], target_masks: Sequence[ArrayLike]) -> dict[str, float]:
    """Referring-segmentation cIoU and gIoU over a set of (prediction, target) binary masks.

    - ``ciou`` (cumulative IoU) = Σ intersections / Σ unions over the whole set — large objects weigh
      more. If every mask of the set is empty (Σ unions = 0) it is 1.0.
    - ``giou`` (generalized IoU, LISA's name) = mean of per-sample IoU; a sample whose target and
      prediction are both empty counts as 1.0, an empty target with a non-empty prediction as 0.0.

    Each pair must have the same shape; different pairs may differ in size.

    Returns:
        ``{"ciou": float, "giou": float, "n": int}``.

    Raises:
        MetricInputError: different numbers of predictions and targets, an empty set, or a pair of
            masks with different shapes.
    """
    n = check_same_length("pred_masks", pred_masks, "target_masks", target_masks)
    _require_nonempty("pred_masks", n)
    ious = np.empty(n, dtype=np.float64)
    inter_sum = 0.0
    union_sum = 0.0
    for i, (pred, target) in enumerate(zip(pred_masks, target_masks)):
        try:
            ious[i], inter, union = mask_iou(pred, target)
        except MetricInputError as exc:
            raise MetricInputError(f"sample {i}: {exc}") from exc
        inter_sum += inter
        union_sum += union
    return {
        "ciou": inter_sum / union_sum if union_sum > 0 else 1.0,
        "giou": float(ious.mean()),
        "n": n,
    }


def rec_accuracy(pred_boxes: ArrayLike, target_boxes: ArrayLike,
                 threshold: float = REC_IOU_THRESHOLD) -> dict[str, float]:
    """Referring-expression comprehension accuracy: fraction of samples with IoU > ``threshold``.

    The comparison is **strict** (``IoU > 0.5``, as REFERENCE.md states): a box with IoU exactly 0.5
    is a miss. Boxes are ``(N, 4)`` xyxy pixels, one prediction per target. A prediction row that is
    entirely NaN means the model produced no box: it counts as IoU 0.

    Returns:
        ``{"acc@0.5": float, "miou": float, "n": int}`` — the accuracy key names the threshold used
        (``f"acc@{threshold:g}"``); ``miou`` is the mean IoU.

    Raises:
        MetricInputError: shapes are not ``(N, 4)``, lengths differ, the set is empty, a target is NaN.
    """
    pred = as_boxes(pred_boxes, "pred_boxes", allow_nan=True)
    target = as_boxes(target_boxes, "target_boxes")
    n = check_same_length("pred_boxes", pred, "target_boxes", target)
    _require_nonempty("pred_boxes", n)
    ious = box_iou_pairwise(pred, target)
    return {f"acc@{threshold:g}": float(np.mean(ious > threshold)), "miou": float(ious.mean()), "n": n}


def temporal_grounding(pred_intervals: ArrayLike, target_intervals: ArrayLike,
                       thresholds: Sequence[float] = TEMPORAL_IOU_THRESHOLDS) -> dict[str, float]:
    """Temporal grounding (moment retrieval) with one prediction per query: R@1 at IoU thresholds, mIoU.

    ``R@1,IoU=m`` is the fraction of queries whose top-1 interval has IoU **≥** m with the target — the
    convention of the Charades-STA evaluation code (2D-TAN, Moment-DETR). Intervals are ``(start, end)``.

    Returns:
        ``{"r1@0.3": float, "r1@0.5": float, "r1@0.7": float, "miou": float, "n": int}`` (one ``r1@m``
        key per threshold, formatted with ``:g``).

    Raises:
        MetricInputError: lengths differ, the set is empty, or an interval is malformed.
    """
    pred = as_float_array(pred_intervals, "pred_intervals")
    target = as_float_array(target_intervals, "target_intervals")
    n = check_same_length("pred_intervals", pred, "target_intervals", target)
    _require_nonempty("pred_intervals", n)
    ious = np.array([interval_iou(p, t) for p, t in zip(pred, target)], dtype=np.float64)
    out: dict[str, float] = {f"r1@{m:g}": float(np.mean(ious >= m)) for m in thresholds}
    out["miou"] = float(ious.mean())
    out["n"] = n
    return out
