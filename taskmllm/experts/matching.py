"""Hungarian matching of predicted boxes to target boxes (DETR costs), solved by scipy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from taskmllm.experts.boxes import generalized_box_iou


@dataclass(frozen=True)
class MatchCosts:
    """Weights of the matching cost ``w_obj * (-p) + w_l1 * L1 + w_giou * (-GIoU)`` (DETR: 1, 5, 2)."""

    objectness: float = 1.0
    l1: float = 5.0
    giou: float = 2.0


class HungarianMatcher:
    """One-to-one assignment of K predictions to M <= K targets minimising the DETR cost."""

    def __init__(self, costs: MatchCosts) -> None:
        self.costs = costs

    def cost_matrix(
        self, pred_boxes: torch.Tensor, pred_logits: torch.Tensor, target_boxes: torch.Tensor
    ) -> torch.Tensor:
        """``(K, 4)`` xyxy, ``(K,)`` objectness logits, ``(M, 4)`` xyxy -> ``(K, M)`` cost."""
        prob = pred_logits.sigmoid()
        cost_obj = -prob[:, None].expand(-1, target_boxes.shape[0])
        cost_l1 = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(pred_boxes, target_boxes)
        return self.costs.objectness * cost_obj + self.costs.l1 * cost_l1 + self.costs.giou * cost_giou

    @torch.no_grad()
    def match(
        self, pred_boxes: torch.Tensor, pred_logits: torch.Tensor, target_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(pred_idx, target_idx)``, each ``(min(K, M),)`` long, target_idx sorted by pred_idx."""
        k, m = pred_boxes.shape[0], target_boxes.shape[0]
        if k == 0 or m == 0:
            empty = torch.zeros(0, dtype=torch.long, device=pred_boxes.device)
            return empty, empty.clone()
        cost = self.cost_matrix(pred_boxes.float(), pred_logits.float(), target_boxes.float())
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        order = np.argsort(rows)
        device = pred_boxes.device
        return (
            torch.as_tensor(rows[order], dtype=torch.long, device=device),
            torch.as_tensor(cols[order], dtype=torch.long, device=device),
        )
