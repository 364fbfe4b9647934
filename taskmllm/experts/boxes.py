"""Box helpers in plain torch (no compiled ops): format conversion, IoU and generalized IoU.

Boxes are ``x1, y1, x2, y2`` (xyxy) or ``cx, cy, w, h`` (cxcywh), in any unit, last dimension 4.
GIoU (Rezatofighi et al. 2019): ``GIoU = IoU - |C \\ (A ∪ B)| / |C|`` with C the smallest enclosing box.
"""

from __future__ import annotations

import torch

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` cx, cy, w, h -> ``(..., 4)`` x1, y1, x2, y2."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` x1, y1, x2, y2 -> ``(..., 4)`` cx, cy, w, h."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyxy -> ``(...)`` area (degenerate boxes have area 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _union_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union of broadcastable ``(..., 4)`` xyxy boxes."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter, union = _union_terms(a, b)
    iou = inter / union.clamp(min=_EPS)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``(N, 4)``, ``(M, 4)`` xyxy -> ``(N, M)``."""
    inter, union = _union_terms(a[:, None, :], b[None, :, :])
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU in ``[-1, 1]``: ``(N, 4)``, ``(M, 4)`` xyxy -> ``(N, M)``."""
    return _giou(a[:, None, :], b[None, :, :])


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding boxes: ``(..., 4)``, ``(..., 4)`` -> ``(...)``."""
    inter, union = _union_terms(a, b)
    return inter / union.clamp(min=_EPS)


def elementwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding boxes: ``(..., 4)``, ``(..., 4)`` -> ``(...)``."""
    return _giou(a, b)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: ``boxes (N, 4)`` xyxy, ``scores (N,)`` -> indices of the kept boxes,
    highest score first. A box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold``
    (torchvision's ``ops.nms`` semantics, without its compiled op)."""
    order = torch.argsort(scores, descending=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N), rows and columns in score order
    keep: list[int] = []
    for i in range(order.numel()):
        if all(float(iou[i, j]) <= iou_threshold for j in keep):
            keep.append(i)
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
