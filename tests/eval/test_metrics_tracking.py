"""OPE success AUC / precision@20 px on hand-computed sequences, with invisible and lost frames."""

from __future__ import annotations

import numpy as np
import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.tracking import IOU_THRESHOLDS, PIXEL_THRESHOLDS, success_curve, tracking_metrics

NAN = [np.nan] * 4
GT = [0, 0, 10, 10]


def _seq_a() -> tuple[list[list[float]], list[list[float]]]:
    pred = [
        [0, 0, 10, 10],   # IoU 1, center error 0
        [0, 0, 10, 5],    # IoU 0.5, centers (5, 2.5) vs (5, 5) -> error 2.5
        [50, 50, 60, 60],  # ground truth invisible -> frame skipped
        [30, 0, 40, 10],  # IoU 0, centers (35, 5) vs (5, 5) -> error 30
    ]
    gt = [GT, GT, NAN, GT]
    return pred, gt


def test_thresholds_follow_otb() -> None:
    assert len(IOU_THRESHOLDS) == 21 and IOU_THRESHOLDS[0] == 0.0 and IOU_THRESHOLDS[-1] == 1.0
    assert PIXEL_THRESHOLDS[20] == 20.0 and len(PIXEL_THRESHOLDS) == 51


def test_single_sequence_hand_computed() -> None:
    pred, gt = _seq_a()
    out = tracking_metrics([pred], [gt])
    # visible IoUs [1, 0.5, 0]; success(t) = fraction with IoU > t:
    #   t = 0 .. 0.45 (10 thresholds): {1, 0.5} -> 2/3;  t = 0.5 .. 0.95 (10): {1} -> 1/3 (0.5 is not > 0.5);
    #   t = 1: nothing -> 0.   AUC = (10 * 2/3 + 10 * 1/3 + 0) / 21 = 10/21
    assert out["success_curve"]["values"][:10] == pytest.approx([2 / 3] * 10)
    assert out["success_curve"]["values"][10:20] == pytest.approx([1 / 3] * 10)
    assert out["success_curve"]["values"][20] == 0.0
    assert out["success_auc"] == pytest.approx(10 / 21)
    # center errors [0, 2.5, 30] -> two of three within 20 px
    assert out["precision@20"] == pytest.approx(2 / 3)
    assert out["precision_curve"]["values"][0] == pytest.approx(1 / 3)  # only the exact hit at 0 px
    assert out["n_frames"] == 3 and out["n_sequences"] == 1
    assert out["mean_iou"] == pytest.approx(0.5)


def test_sequences_are_averaged_and_empty_ones_skipped() -> None:
    pred_a, gt_a = _seq_a()
    pred_b, gt_b = [GT, GT], [GT, GT]  # perfect: IoU 1 > t for the 20 thresholds below 1 -> AUC 20/21
    pred_c, gt_c = [GT], [NAN]  # never visible -> left out
    out = tracking_metrics([pred_a, pred_b, pred_c], [gt_a, gt_b, gt_c])
    assert out["per_sequence_auc"] == pytest.approx([10 / 21, 20 / 21, None])
    assert out["success_auc"] == pytest.approx((10 / 21 + 20 / 21) / 2)
    assert out["precision@20"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["n_sequences"] == 2 and out["n_frames"] == 5


def test_visibility_flags_and_lost_target() -> None:
    # frame 1 flagged invisible; frame 2: the tracker reports the target lost (NaN) -> IoU 0, infinite error
    pred = [GT, GT, NAN]
    gt = [GT, [0, 0, 5, 5], GT]
    out = tracking_metrics([pred], [gt], visible=[[True, False, True]])
    assert out["n_frames"] == 2
    assert out["precision@20"] == pytest.approx(1 / 2)
    assert out["success_auc"] == pytest.approx((20 * 0.5 + 0) / 21)


def test_success_curve_strict() -> None:
    assert success_curve([0.5], [0.5]).tolist() == [0.0]


def test_bad_input() -> None:
    with pytest.raises(MetricInputError, match="no sequence"):
        tracking_metrics([[GT]], [[NAN]])
    with pytest.raises(MetricInputError, match="sequence 0"):
        tracking_metrics([[GT, GT]], [[GT]])
    with pytest.raises(MetricInputError):
        tracking_metrics([[GT]], [[GT]], visible=[[True, True]])
    with pytest.raises(MetricInputError):
        tracking_metrics([[GT]], [])
