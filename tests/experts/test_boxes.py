"""Box helpers against hand-computed values and torchvision's pure-python GIoU."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_giou

from taskmllm.experts.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    nms,
)

# (a, b, IoU, GIoU) computed by hand
CASES = [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # overlap 1, union 7, hull 9
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: union 2, hull 3
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),  # contained: hull = union
    ([0, 0, 2, 1], [0, 0, 2, 1], 1.0, 1.0),  # identical
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),  # touching edges: hull = union
]


@pytest.mark.parametrize("a, b, iou, giou", CASES)
def test_hand_computed_cases(a, b, iou, giou):
    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert box_iou(ta, tb).item() == pytest.approx(iou, abs=1e-9)
    assert generalized_box_iou(ta, tb).item() == pytest.approx(giou, abs=1e-9)
    assert elementwise_box_iou(ta, tb).item() == pytest.approx(iou, abs=1e-9)
    assert elementwise_generalized_box_iou(ta, tb).item() == pytest.approx(giou, abs=1e-9)
    # symmetric
    assert generalized_box_iou(tb, ta).item() == pytest.approx(giou, abs=1e-9)


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen)
    wh = torch.rand(n, 2, generator=gen) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


def test_pairwise_matches_torchvision_and_elementwise_matches_diagonal():
    gen = torch.Generator().manual_seed(0)
    a, b = _random_boxes(7, gen), _random_boxes(5, gen)
    torch.testing.assert_close(generalized_box_iou(a, b), tv_giou(a, b))
    sq = _random_boxes(5, gen)
    torch.testing.assert_close(elementwise_generalized_box_iou(sq, b), generalized_box_iou(sq, b).diagonal())
    torch.testing.assert_close(elementwise_box_iou(sq, b), box_iou(sq, b).diagonal())
    g = generalized_box_iou(a, b)
    assert (g <= box_iou(a, b) + 1e-6).all() and (g >= -1).all()


def test_format_round_trip_and_area():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh[0], torch.tensor([0.3, 0.55, 0.4, 0.7]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([0.28, 1.0]))
    assert box_area(torch.tensor([[0.5, 0.5, 0.2, 0.9]])).item() == 0.0  # degenerate (x2 < x1)


def test_giou_gives_gradient_for_disjoint_boxes():
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]], requires_grad=True)
    b = torch.tensor([[0.6, 0.6, 0.9, 0.9]])
    (1 - elementwise_generalized_box_iou(a, b)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0  # plain IoU would give zero gradient here


def test_nms_by_hand_and_against_torchvision():
    """Hand case: B overlaps A by IoU 0.81 (dropped at 0.5, kept at 0.9), C is disjoint; then torchvision's
    ``ops.nms`` as the oracle on random boxes at several thresholds."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.95, 0.5])  # B first: 81 / 100 with A
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]
    from torchvision.ops import nms as tv_nms

    gen = torch.Generator().manual_seed(1)
    for threshold in (0.1, 0.3, 0.5, 0.7):
        b, s = _random_boxes(30, gen), torch.rand(30, generator=gen)
        assert nms(b, s, threshold).tolist() == tv_nms(b, s, threshold).tolist()
