"""Referring segmentation cIoU/gIoU, REC Acc@0.5 and temporal grounding on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.grounding import rec_accuracy, referring_segmentation, temporal_grounding


def _mask(pixels: list[tuple[int, int]], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        m[r, c] = True
    return m


def test_ciou_and_giou_hand_computed() -> None:
    # A: pred 4 px, target 4 px, overlap 2 -> I=2, U=6, IoU 1/3
    pred_a = _mask([(0, 0), (0, 1), (0, 2), (0, 3)])
    tgt_a = _mask([(0, 2), (0, 3), (1, 2), (1, 3)])
    # B: both empty -> IoU 1 (counts as 1 for gIoU), I=U=0
    empty = _mask([])
    # C: empty prediction, 2 px target -> IoU 0, I=0, U=2
    tgt_c = _mask([(3, 3), (3, 2)])
    out = referring_segmentation([pred_a, empty, empty], [tgt_a, empty, tgt_c])
    assert out["ciou"] == pytest.approx(2 / 8)  # (2 + 0 + 0) / (6 + 0 + 2)
    assert out["giou"] == pytest.approx((1 / 3 + 1 + 0) / 3)  # = 4/9
    assert out["n"] == 3


def test_ciou_weighs_large_objects_more_than_giou() -> None:
    big = np.ones((10, 10), bool)
    small_t = _mask([(0, 0)], (10, 10))
    small_p = _mask([(9, 9)], (10, 10))
    out = referring_segmentation([big, small_p], [big, small_t])
    assert out["giou"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["ciou"] == pytest.approx(100 / 102)  # (100 + 0) / (100 + 2)


def test_all_empty_set_is_perfect() -> None:
    out = referring_segmentation([np.zeros((2, 2))], [np.zeros((2, 2))])
    assert out["ciou"] == 1.0 and out["giou"] == 1.0


def test_refseg_bad_input() -> None:
    with pytest.raises(MetricInputError, match="pair up"):
        referring_segmentation([np.zeros((2, 2))], [])
    with pytest.raises(MetricInputError, match="sample 0"):
        referring_segmentation([np.zeros((2, 2))], [np.zeros((3, 3))])
    with pytest.raises(MetricInputError, match="empty"):
        referring_segmentation([], [])


def test_rec_accuracy_uses_strict_threshold() -> None:
    target = [[0, 0, 10, 10]] * 4
    pred = [
        [0, 0, 10, 5],  # IoU 50/100 = 0.5 exactly -> NOT a hit (IoU > 0.5 is required)
        [0, 0, 10, 6],  # IoU 0.6 -> hit
        [0, 0, 10, 4],  # IoU 0.4 -> miss
        [np.nan] * 4,   # no box produced -> IoU 0, miss
    ]
    out = rec_accuracy(pred, target)
    assert out["acc@0.5"] == pytest.approx(1 / 4)
    assert out["miou"] == pytest.approx((0.5 + 0.6 + 0.4 + 0.0) / 4)
    assert out["n"] == 4
    # the same boxes at a custom threshold: IoU 0.5 and 0.6 exceed 0.45
    assert rec_accuracy(pred, target, threshold=0.45)["acc@0.45"] == pytest.approx(2 / 4)


def test_rec_bad_input() -> None:
    with pytest.raises(MetricInputError):
        rec_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(MetricInputError, match="NaN"):
        rec_accuracy([[0, 0, 1, 1]], [[np.nan] * 4])


def test_temporal_grounding_hand_computed() -> None:
    target = [(0, 10)] * 4
    # IoUs with (0, 10): 3/10, 5/10, 7/10, 0 -- recall uses IoU >= m (Charades-STA convention)
    pred = [(0, 3), (0, 5), (0, 7), (20, 30)]
    out = temporal_grounding(pred, target)
    assert out["r1@0.3"] == pytest.approx(3 / 4)
    assert out["r1@0.5"] == pytest.approx(2 / 4)
    assert out["r1@0.7"] == pytest.approx(1 / 4)
    assert out["miou"] == pytest.approx((0.3 + 0.5 + 0.7 + 0) / 4)
    assert out["n"] == 4


def test_temporal_grounding_bad_input() -> None:
    with pytest.raises(MetricInputError, match="ends before"):
        temporal_grounding([(5, 1)], [(0, 1)])
    with pytest.raises(MetricInputError):
        temporal_grounding([(0, 1)], [(0, 1), (0, 2)])
