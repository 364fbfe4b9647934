"""Single-object tracking metrics, one-pass evaluation (OPE) as in the OTB / LaSOT toolkits.

- **Success**: for each IoU threshold t in ``0, 0.05, …, 1`` (21 thresholds) the fraction of frames with
  IoU **>** t (strict, as OTB's ``overlap > threshold``); the success AUC is the mean of the 21 values.
- **Precision**: for each center-location-error threshold ``0, 1, …, 50`` px the fraction of frames with
  error **≤** the threshold (OTB's ``errCenter <= threshold``); "precision@20" is the value at 20 px.
  Centers of xyxy boxes are ``((x1 + x2) / 2, (y1 + y2) / 2)``.

Invisible frames: a frame whose ground truth is absent — its row is all NaN, or ``visible[i]`` is False —
is **skipped** (it counts for neither success nor precision), as LaSOT does for out-of-view frames. A
predicted row of all NaN on a visible frame means the tracker reported the target lost: IoU 0 and
infinite center error (a miss at every threshold).

Curves are computed per sequence and averaged over sequences (each sequence weighs the same, as in the
toolkits); sequences without any visible frame are left out of the average.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import as_boxes, box_centers, box_iou_pairwise, check_same_length

__all__ = ["IOU_THRESHOLDS", "PIXEL_THRESHOLDS", "PRECISION_PIXELS", "center_errors", "precision_curve",
           "sequence_overlaps", "success_curve", "tracking_metrics"]

#: 21 IoU thresholds of the success plot: 0, 0.05, ..., 1.
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(21))
#: Center-error thresholds of the precision plot in pixels: 0, 1, ..., 50.
PIXEL_THRESHOLDS: tuple[float, ...] = tuple(float(k) for k in range(51))
#: The precision value reported as "precision@20".
PRECISION_PIXELS = 20.0


def success_curve(ious: ArrayLike, thresholds: ArrayLike = IOU_THRESHOLDS) -> NDArray[np.float64]:
    """Fraction of frames with IoU strictly greater than each threshold."""
    iou = np.asarray(ious, dtype=np.float64).reshape(-1)
    if iou.size == 0:
        raise MetricInputError("success curve of zero frames is undefined")
    return np.array([np.mean(iou > t) for t in np.asarray(thresholds, dtype=np.float64)])


def precision_curve(errors: ArrayLike, thresholds: ArrayLike = PIXEL_THRESHOLDS) -> NDArray[np.float64]:
    """Fraction of frames whose center-location error is at most each pixel threshold."""
    err = np.asarray(errors, dtype=np.float64).reshape(-1)
    if err.size == 0:
        raise MetricInputError("precision curve of zero frames is undefined")
    return np.array([np.mean(err <= t) for t in np.asarray(thresholds, dtype=np.float64)])


def _visible_rows(gt: NDArray[np.float64], visible: ArrayLike | None, where: str) -> NDArray[np.bool_]:
    keep = ~np.isnan(gt).all(axis=1)
    if visible is not None:
        vis = np.asarray(visible).reshape(-1)
        if vis.shape[0] != gt.shape[0]:
            raise MetricInputError(f"{where}: visible has {vis.shape[0]} frames, ground truth {gt.shape[0]}")
        keep &= vis.astype(bool)
    return keep


def sequence_overlaps(pred_boxes: ArrayLike, gt_boxes: ArrayLike,
                      visible: ArrayLike | None = None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-frame IoU and center error of one sequence, over its visible frames only.

    Args:
        pred_boxes: ``(T, 4)`` xyxy; an all-NaN row means "target lost".
        gt_boxes: ``(T, 4)`` xyxy; an all-NaN row means "target not visible" (frame skipped).
        visible: optional ``(T,)`` booleans; False skips the frame too.

    Returns:
        ``(ious, center_errors)``, each of length = number of visible frames.
    """
    pred = as_boxes(pred_boxes, "pred_boxes", allow_nan=True)
    gt = as_boxes(gt_boxes, "gt_boxes", allow_nan=True)
    check_same_length("pred_boxes (frames)", pred, "gt_boxes (frames)", gt)
    keep = _visible_rows(gt, visible, "sequence")
    pred, gt = pred[keep], gt[keep]
    return box_iou_pairwise(pred, gt), center_errors(pred, gt)


def center_errors(pred_boxes: ArrayLike, gt_boxes: ArrayLike) -> NDArray[np.float64]:
    """Euclidean distance in pixels between box centers; ``inf`` where the prediction is missing (NaN)."""
    diff = box_centers(pred_boxes) - box_centers(gt_boxes)
    err = np.sqrt((diff ** 2).sum(axis=1))
    return np.where(np.isnan(err), np.inf, err)


def tracking_metrics(pred_tracks: Sequence[ArrayLike], gt_tracks: Sequence[ArrayLike],
                     visible: Sequence[ArrayLike | None] | None = None) -> dict[str, object]:
    """OPE success AUC and precision@20 px over a set of sequences.

    Args:
        pred_tracks: per sequence a ``(T, 4)`` array of predicted xyxy boxes.
        gt_tracks: per sequence a ``(T, 4)`` array of ground-truth xyxy boxes (NaN rows = invisible).
        visible: optional per-sequence ``(T,)`` visibility flags (or None for a sequence).

    Returns:
        ``{"success_auc": float, "precision@20": float, "mean_iou": float,
        "success_curve": {"thresholds": [21 floats], "values": [21 floats]},
        "precision_curve": {"thresholds": [51 floats], "values": [51 floats]},
        "per_sequence_auc": [floats or None for skipped sequences], "n_sequences": int, "n_frames": int}``
        where ``n_sequences`` / ``n_frames`` count evaluated sequences / visible frames, and ``mean_iou``
        is the mean per-sequence average overlap.

    Raises:
        MetricInputError: mismatched lengths, malformed boxes, or no visible frame in any sequence.
    """
    n = check_same_length("pred_tracks", pred_tracks, "gt_tracks", gt_tracks)
    if visible is not None:
        check_same_length("visible", visible, "gt_tracks", gt_tracks)
    successes: list[NDArray[np.float64]] = []
    precisions: list[NDArray[np.float64]] = []
    mean_ious: list[float] = []
    per_sequence: list[float | None] = []
    n_frames = 0
    for i in range(n):
        try:
            ious, errors = sequence_overlaps(pred_tracks[i], gt_tracks[i], None if visible is None else visible[i])
        except MetricInputError as exc:
            raise MetricInputError(f"sequence {i}: {exc}") from exc
        if ious.size == 0:
            per_sequence.append(None)
            continue
        succ = success_curve(ious)
        successes.append(succ)
        precisions.append(precision_curve(errors))
        mean_ious.append(float(ious.mean()))
        per_sequence.append(float(succ.mean()))
        n_frames += int(ious.size)
    if not successes:
        raise MetricInputError("no sequence has a visible ground-truth frame; tracking metrics are undefined")
    success = np.mean(successes, axis=0)
    precision = np.mean(precisions, axis=0)
    at20 = PIXEL_THRESHOLDS.index(PRECISION_PIXELS)
    return {
        "success_auc": float(success.mean()),
        "precision@20": float(precision[at20]),
        "mean_iou": float(np.mean(mean_ious)),
        "success_curve": {"thresholds": list(IOU_THRESHOLDS), "values": success.tolist()},
        "precision_curve": {"thresholds": list(PIXEL_THRESHOLDS), "values": precision.tolist()},
        "per_sequence_auc": per_sequence,
        "n_sequences": len(successes),
        "n_frames": n_frames,
    }
