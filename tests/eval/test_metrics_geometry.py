"""Box, mask and interval IoU: hand-computed cases, conventions and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmllm.errors import MetricInputError, TaskMLLMError
from taskmllm.eval.geometry import box_iou, box_iou_pairwise, interval_iou, mask_iou


def test_box_iou_hand_computed() -> None:
    # [0,10]^2 and [5,15]^2: intersection 5*5 = 25, union 100 + 100 - 25 = 175 -> 25/175 = 1/7
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # touching edges share no area (continuous coordinates, no +1)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    # contained: 25 / 100
    assert box_iou([0, 0, 10, 10], [0, 0, 5, 5]) == pytest.approx(0.25)


def test_missing_box_is_a_miss_and_both_missing_is_an_error() -> None:
    nan = [np.nan] * 4
    assert box_iou_pairwise([nan], [[0, 0, 1, 1]]).tolist() == [0.0]
    with pytest.raises(MetricInputError):
        box_iou_pairwise([nan], [nan])


@pytest.mark.parametrize("bad", [[0, 0, 1], [2, 0, 1, 1], [0, np.nan, 1, 1], [0, 0, np.inf, 1]])
def test_bad_boxes_raise_typed_error(bad: list[float]) -> None:
    with pytest.raises(MetricInputError):
        box_iou(bad, [0, 0, 1, 1])


def test_metric_input_error_is_a_value_error_of_the_project() -> None:
    with pytest.raises(ValueError):
        box_iou_pairwise([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]])
    assert issubclass(MetricInputError, TaskMLLMError)


def test_mask_iou_hand_computed_and_empty() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, overlap 2 -> union 4
    assert mask_iou(a, b) == (0.5, 2.0, 4.0)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == (1.0, 0.0, 0.0)
    with pytest.raises(MetricInputError, match="shape"):
        mask_iou(np.zeros((2, 2)), np.zeros((2, 3)))


def test_interval_iou() -> None:
    assert interval_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)  # overlap 5, union 15
    assert interval_iou((0, 1), (2, 3)) == 0.0
    assert interval_iou((2, 2), (2, 2)) == 1.0
    assert interval_iou((2, 2), (3, 3)) == 0.0
    with pytest.raises(MetricInputError, match="ends before"):
        interval_iou((5, 1), (0, 1))


coord = st.floats(0, 100, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(coord, coord, coord, coord, coord, coord, coord, coord)
def test_box_iou_is_symmetric_and_bounded(a0: float, a1: float, a2: float, a3: float,
                                          b0: float, b1: float, b2: float, b3: float) -> None:
    a = [min(a0, a2), min(a1, a3), max(a0, a2), max(a1, a3)]
    b = [min(b0, b2), min(b1, b3), max(b0, b2), max(b1, b3)]
    iou = box_iou(a, b)
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(box_iou(b, a))


def test_ragged_input_is_a_typed_error() -> None:
    with pytest.raises(MetricInputError, match="rectangular"):
        box_iou_pairwise([[0, 0, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(MetricInputError, match="rectangular"):
        interval_iou(("a", 1), (0, 1))
