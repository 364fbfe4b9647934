"""COCO detection / instance-segmentation AP through pycocotools, built in memory.

Ground truth and predictions are per-image lists of boxes (xyxy pixels) — or binary masks for
``iou_type="segm"`` — with class labels (and scores for predictions). They are converted into COCO's
ground-truth and result structures (boxes to ``[x, y, w, h]``, masks to RLE), evaluated with
:class:`pycocotools.cocoeval.COCOeval` (its printing is silenced) and the summary numbers returned.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import as_boxes, as_float_array, check_same_length

__all__ = ["DetectionGroundTruth", "DetectionPrediction", "build_coco_ground_truth", "build_coco_results",
           "coco_ap"]

IoUType = Literal["bbox", "segm"]

# COCOeval.stats order (see COCOeval.summarize).
_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
               "AR_small", "AR_medium", "AR_large")


@dataclass(frozen=True)
class DetectionGroundTruth:
    """Ground truth of one image.

    Attributes:
        boxes: ``(N, 4)`` xyxy pixels. For ``segm`` evaluation they may be left empty (derived from masks).
        labels: ``(N,)`` integer class ids.
        height, width: image size in pixels.
        masks: optional ``(N, H, W)`` binary instance masks (needed for ``segm``).
    """

    boxes: ArrayLike
    labels: ArrayLike
    height: int
    width: int
    masks: ArrayLike | None = field(default=None)


@dataclass(frozen=True)
class DetectionPrediction:
    """Predictions for one image: ``(N, 4)`` xyxy boxes, ``(N,)`` scores, ``(N,)`` class ids, optional masks."""

    boxes: ArrayLike
    scores: ArrayLike
    labels: ArrayLike
    masks: ArrayLike | None = field(default=None)


def _labels(labels: ArrayLike, n: int, where: str) -> NDArray[np.int64]:
    arr = np.asarray(labels).reshape(-1)
    if arr.shape[0] != n:
        raise MetricInputError(f"{where}: {arr.shape[0]} labels for {n} instances")
    if arr.size and not np.all(np.equal(np.mod(arr.astype(np.float64), 1), 0)):
        raise MetricInputError(f"{where}: class labels must be integers")
    return arr.astype(np.int64)


def _masks(masks: ArrayLike | None, n: int, height: int, width: int, where: str) -> NDArray[np.uint8]:
    if masks is None:
        if n == 0:
            return np.zeros((0, height, width), dtype=np.uint8)
        raise MetricInputError(f"{where}: iou_type='segm' needs masks")
    arr = np.asarray(masks)
    if n == 0 and arr.size == 0:
        return np.zeros((0, height, width), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape != (n, height, width):
        raise MetricInputError(f"{where}: masks must have shape ({n}, {height}, {width}); got {arr.shape}")
    return arr.astype(bool).astype(np.uint8)


def _rle(mask: NDArray[np.uint8]) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, accepted by pycocotools
    return rle


def _xywh(box: NDArray[np.float64]) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def build_coco_ground_truth(ground_truths: Sequence[DetectionGroundTruth],
                            iou_type: IoUType = "bbox") -> dict[str, Any]:
    """COCO ground-truth JSON structure (``images``, ``annotations``, ``categories``), image ids ``1..N``.

    Annotation ids start at 1 (pycocotools treats id 0 as "unmatched"); ``area`` is ``w*h`` for boxes
    and the mask area for ``segm``; ``iscrowd`` is 0. Categories are the sorted set of ground-truth labels.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: set[int] = set()
    for img_idx, gt in enumerate(ground_truths):
        image_id = img_idx + 1
        where = f"ground truth of image {img_idx}"
        if int(gt.height) <= 0 or int(gt.width) <= 0:
            raise MetricInputError(f"{where}: image size must be positive, got {gt.height}x{gt.width}")
        images.append({"id": image_id, "height": int(gt.height), "width": int(gt.width)})
        if iou_type == "segm":
            masks = _masks(gt.masks, len(np.asarray(gt.labels).reshape(-1)), gt.height, gt.width, where)
            labels = _labels(gt.labels, masks.shape[0], where)
            for mask, label in zip(masks, labels):
                rle = _rle(mask)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": int(label), "segmentation": rle,
                                    "area": float(mask_utils.area(rle)),
                                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
                categories.add(int(label))
        else:
            boxes = as_boxes(gt.boxes, f"{where} boxes")
            labels = _labels(gt.labels, boxes.shape[0], where)
            for box, label in zip(boxes, labels):
                xywh = _xywh(box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": int(label), "bbox": xywh, "area": xywh[2] * xywh[3],
                                    "iscrowd": 0})
                categories.add(int(label))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)]}


def build_coco_results(predictions: Sequence[DetectionPrediction], ground_truths: Sequence[DetectionGroundTruth],
                       iou_type: IoUType = "bbox") -> list[dict[str, Any]]:
    """COCO result list (``image_id``, ``category_id``, ``score`` and ``bbox`` or RLE ``segmentation``)."""
    check_same_length("predictions", predictions, "ground_truths", ground_truths)
    results: list[dict[str, Any]] = []
    for img_idx, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        image_id = img_idx + 1
        where = f"prediction of image {img_idx}"
        scores = as_float_array(pred.scores, f"{where} scores").reshape(-1)
        if not np.isfinite(scores).all():
            raise MetricInputError(f"{where}: scores must be finite")
        if iou_type == "segm":
            masks = _masks(pred.masks, scores.shape[0], gt.height, gt.width, where)
            labels = _labels(pred.labels, masks.shape[0], where)
            for mask, score, label in zip(masks, scores, labels):
                results.append({"image_id": image_id, "category_id": int(label), "segmentation": _rle(mask),
                                "score": float(score)})
        else:
            boxes = as_boxes(pred.boxes, f"{where} boxes")
            if boxes.shape[0] != scores.shape[0]:
                raise MetricInputError(f"{where}: {scores.shape[0]} scores for {boxes.shape[0]} boxes")
            labels = _labels(pred.labels, boxes.shape[0], where)
            for box, score, label in zip(boxes, scores, labels):
                results.append({"image_id": image_id, "category_id": int(label), "bbox": _xywh(box),
                                "score": float(score)})
    return results


def _pr_curve(evaluator: COCOeval) -> dict[str, list[float]]:
    """Precision vs recall at IoU 0.5, area 'all', maxDets 100, averaged over classes with ground truth."""
    precision = evaluator.eval["precision"][0, :, :, 0, -1]  # (R=101 recall points, K classes)
    recall = [float(r) for r in evaluator.params.recThrs]
    valid = precision > -1
    counts = valid.sum(axis=1)
    sums = np.where(valid, precision, 0.0).sum(axis=1)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return {"recall": recall, "precision": [float(p) for p in mean]}


def coco_ap(ground_truths: Sequence[DetectionGroundTruth], predictions: Sequence[DetectionPrediction],
            iou_type: IoUType = "bbox", class_agnostic: bool = False) -> dict[str, Any]:
    """COCO AP@[.50:.95], AP50, AP75 (and the rest of COCOeval's summary) of per-image predictions.

    Args:
        ground_truths: one entry per image.
        predictions: one entry per image, in the same order (an image without detections has empty arrays).
        iou_type: ``"bbox"`` (box IoU) or ``"segm"`` (mask IoU on RLE-encoded masks).
        class_agnostic: ignore labels (every instance is relabelled as one class).

    Returns:
        ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
        "AR_small", "AR_medium", "AR_large"}`` as floats in ``[0, 1]`` — COCOeval's ``-1`` ("no ground
        truth in this area range") becomes NaN — plus ``"pr_curve": {"recall": [101 floats],
        "precision": [101 floats]}`` at IoU 0.5 (for plotting), ``"n_images"`` and ``"n_gt"``.
        With no predictions at all every AP/AR is 0.0.

    Raises:
        MetricInputError: no ground-truth instance at all (AP is undefined), mismatched lengths,
            malformed boxes/masks/labels, or an unknown ``iou_type``.
    """
    if iou_type not in ("bbox", "segm"):
        raise MetricInputError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    check_same_length("ground_truths", ground_truths, "predictions", predictions)
    gt_json = build_coco_ground_truth(ground_truths, iou_type)
    if not gt_json["annotations"]:
        raise MetricInputError("there is no ground-truth instance in any image; AP is undefined")
    dt_json = build_coco_results(predictions, ground_truths, iou_type)
    if class_agnostic:
        # COCOeval's useCats=0 still drops detections whose category is absent from the ground truth,
        # so relabel everything as one class instead.
        for ann in (*gt_json["annotations"], *dt_json):
            ann["category_id"] = 1
        gt_json["categories"] = [{"id": 1, "name": "object"}]
    base = {"n_images": len(ground_truths), "n_gt": len(gt_json["annotations"])}
    if not dt_json:
        zeros: dict[str, Any] = {name: 0.0 for name in _STAT_NAMES}
        recall = [float(r) for r in np.linspace(0.0, 1.0, 101)]
        return {**zeros, "pr_curve": {"recall": recall, "precision": [0.0] * 101}, **base}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_json)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: (float(v) if v > -1 else float("nan")) for name, v in zip(_STAT_NAMES, evaluator.stats)}
    return {**stats, "pr_curve": _pr_curve(evaluator), **base}
