"""All evaluation metrics in one import: ``from taskmllm.eval.metrics import giou, coco_ap, ...``.

Every metric is a pure function on numpy arrays / plain Python (no torch) returning a dict of plain
Python numbers (fractions in ``[0, 1]`` unless the key says otherwise) and, where useful for plots,
lists. Bad input raises :class:`taskmllm.errors.MetricInputError` (a ``ValueError``). The
implementations live one concept per module:

- :mod:`~taskmllm.eval.geometry` — box / mask / interval IoU and the shared conventions
- :mod:`~taskmllm.eval.grounding` — referring segmentation cIoU/gIoU, REC Acc@0.5, temporal R@1/mIoU
- :mod:`~taskmllm.eval.detection` — COCO AP via pycocotools (boxes and RLE masks)
- :mod:`~taskmllm.eval.tracking` — OPE success AUC and precision@20 px
- :mod:`~taskmllm.eval.hallucination` — POPE (LLaVA's parsing rule) and CHAIR
- :mod:`~taskmllm.eval.vqa` — exact-match VQA accuracy
- :mod:`~taskmllm.eval.routing` — task-token routing accuracy
"""

from __future__ import annotations

from taskmllm.eval.detection import DetectionGroundTruth, DetectionPrediction, coco_ap
from taskmllm.eval.geometry import box_iou, interval_iou, mask_iou
from taskmllm.eval.grounding import rec_accuracy, referring_segmentation, temporal_grounding
from taskmllm.eval.hallucination import ChairVocabulary, chair, pope_metrics, pope_parse, pope_summary
from taskmllm.eval.routing import routing_accuracy
from taskmllm.eval.tracking import tracking_metrics
from taskmllm.eval.vqa import normalize_answer, vqa_accuracy

__all__ = [
    "ChairVocabulary",
    "DetectionGroundTruth",
    "DetectionPrediction",
    "box_iou",
    "chair",
    "coco_ap",
    "interval_iou",
    "mask_iou",
    "normalize_answer",
    "pope_metrics",
    "pope_parse",
    "pope_summary",
    "rec_accuracy",
    "referring_segmentation",
    "routing_accuracy",
    "temporal_grounding",
    "tracking_metrics",
    "vqa_accuracy",
]
