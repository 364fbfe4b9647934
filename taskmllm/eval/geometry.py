"""Overlap measures shared by the metrics: box, mask and interval IoU, box centers, input checks.

Conventions (used by every metric in :mod:`taskmllm.eval`):

- Boxes are ``(x1, y1, x2, y2)`` in pixels, continuous coordinates: width is ``x2 - x1`` (no ``+1``),
  the same convention pycocotools uses for its ``[x, y, w, h]`` boxes.
- Masks are boolean (or 0/1) arrays of identical shape for prediction and target.
- Intervals are ``(start, end)`` with ``end >= start`` (seconds or frames, any unit).
- IoU of two empty regions (zero union) is 1.0 when both are empty: nothing was to be found and nothing
  was predicted. Box IoU with a degenerate (zero-area) box and zero union is defined the same way.
"""

from __future__ import annotations

from collections.abc import Sized

import numpy as np
from numpy.typing import ArrayLike, NDArray

from taskmllm.errors import MetricInputError

__all__ = [
    "box_centers",
    "box_iou",
    "box_iou_pairwise",
    "check_same_length",
    "interval_iou",
    "mask_iou",
    "as_boxes",
    "as_float_array",
]


def check_same_length(name_a: str, a: Sized, name_b: str, b: Sized) -> int:
    """Return the common length of ``a`` and ``b``; raise :class:`MetricInputError` when they differ."""
    if len(a) != len(b):
        raise MetricInputError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}; they must pair up")
    return len(a)


def as_float_array(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``np.asarray(values, float)`` that reports ragged or non-numeric input as :class:`MetricInputError`."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise MetricInputError(f"{name} is not a rectangular array of numbers: {exc}") from exc


def as_boxes(boxes: ArrayLike, name: str = "boxes", allow_nan: bool = False) -> NDArray[np.float64]:
    """Convert ``boxes`` to a float array of shape ``(N, 4)`` (xyxy pixels) and validate it.

    A single box of shape ``(4,)`` becomes ``(1, 4)``; an empty input becomes ``(0, 4)``. Rows with
    ``x2 < x1`` or ``y2 < y1`` are rejected. With ``allow_nan`` rows that are entirely NaN are kept (they
    mean "no box", e.g. an invisible frame); partially NaN rows are always rejected.
    """
    arr = as_float_array(boxes, name)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise MetricInputError(f"{name} must have shape (N, 4) as x1,y1,x2,y2; got {arr.shape}")
    nan_rows = np.isnan(arr)
    all_nan = nan_rows.all(axis=1)
    if (nan_rows.any(axis=1) & ~all_nan).any() or (all_nan.any() and not allow_nan):
        raise MetricInputError(f"{name} contains NaN coordinates")
    valid = arr[~all_nan]
    if np.isinf(valid).any():
        raise MetricInputError(f"{name} contains infinite coordinates")
    if (valid[:, 2] < valid[:, 0]).any() or (valid[:, 3] < valid[:, 1]).any():
        raise MetricInputError(f"{name} must satisfy x2 >= x1 and y2 >= y1 (xyxy format)")
    return arr


def box_iou_pairwise(boxes_a: ArrayLike, boxes_b: ArrayLike) -> NDArray[np.float64]:
    """IoU of row ``i`` of ``boxes_a`` with row ``i`` of ``boxes_b``; both ``(N, 4)`` xyxy.

    Rows that are entirely NaN (no box) give IoU 0 unless both rows are NaN, which is an error the
    caller should have filtered out (it raises :class:`MetricInputError`).
    """
    a = as_boxes(boxes_a, "boxes_a", allow_nan=True)
    b = as_boxes(boxes_b, "boxes_b", allow_nan=True)
    check_same_length("boxes_a", a, "boxes_b", b)
    missing_a = np.isnan(a).all(axis=1)
    missing_b = np.isnan(b).all(axis=1)
    if (missing_a & missing_b).any():
        raise MetricInputError("both boxes of a pair are missing (NaN); IoU is undefined")
    a = np.where(missing_a[:, None], 0.0, a)
    b = np.where(missing_b[:, None], 0.0, b)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    same = np.all(a == b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.where(same, 1.0, 0.0))
    iou = np.where(missing_a | missing_b, 0.0, iou)
    return iou.astype(np.float64)


def box_iou(box_a: ArrayLike, box_b: ArrayLike) -> float:
    """IoU of two single xyxy boxes (pixels)."""
    a = as_boxes(box_a, "box_a", allow_nan=True)
    b = as_boxes(box_b, "box_b", allow_nan=True)
    if a.shape != (1, 4) or b.shape != (1, 4):
        raise MetricInputError(f"box_iou takes two single boxes; got shapes {a.shape} and {b.shape}")
    return float(box_iou_pairwise(a, b)[0])


def box_centers(boxes: ArrayLike) -> NDArray[np.float64]:
    """Centers ``(cx, cy)`` of xyxy boxes, ``(N, 2)``; NaN rows stay NaN."""
    b = as_boxes(boxes, allow_nan=True)
    return np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0], axis=1)


def mask_iou(pred: ArrayLike, target: ArrayLike) -> tuple[float, float, float]:
    """Return ``(iou, intersection, union)`` of two binary masks of the same shape.

    Both masks empty gives ``iou = 1.0`` (with intersection and union 0).
    """
    p = np.asarray(pred)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise MetricInputError(f"prediction mask shape {p.shape} differs from target mask shape {t.shape}")
    p = p.astype(bool)
    t = t.astype(bool)
    inter = float(np.logical_and(p, t).sum())
    union = float(np.logical_or(p, t).sum())
    return (inter / union if union > 0 else 1.0), inter, union


def interval_iou(pred: tuple[float, float] | ArrayLike, target: tuple[float, float] | ArrayLike) -> float:
    """Temporal IoU of two ``(start, end)`` intervals.

    ``inter = max(0, min(e1, e2) - max(s1, s2))`` and ``union = (e1 - s1) + (e2 - s2) - inter``. Two
    identical zero-length intervals have IoU 1.0; otherwise a zero union gives 0.0.
    """
    p = as_float_array(pred, "prediction interval").reshape(-1)
    t = as_float_array(target, "target interval").reshape(-1)
    for name, iv in (("prediction", p), ("target", t)):
        if iv.shape != (2,) or not np.isfinite(iv).all():
            raise MetricInputError(f"{name} interval must be two finite numbers (start, end); got {iv.tolist()}")
        if iv[1] < iv[0]:
            raise MetricInputError(f"{name} interval ends before it starts: {iv.tolist()}")
    inter = max(0.0, min(p[1], t[1]) - max(p[0], t[0]))
    union = (p[1] - p[0]) + (t[1] - t[0]) - inter
    if union <= 0:
        return 1.0 if np.array_equal(p, t) else 0.0
    return float(inter / union)
