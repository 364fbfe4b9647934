"""Mean ± std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.aggregate import aggregate_seeds


def test_mean_and_sample_std() -> None:
    out = aggregate_seeds({
        "none": [{"chair_s": 0.4, "len": 10, "name": "x"}, {"chair_s": 0.6, "len": 12, "name": "y"}],
        "VHR": [{"chair_s": np.float32(0.3), "len": 9}],
    })
    # none: mean 0.5; sample std of {0.4, 0.6} = sqrt(((-.1)^2 + .1^2) / 1) = 0.1414
    assert out["none"]["chair_s"]["mean"] == pytest.approx(0.5)
    assert out["none"]["chair_s"]["std"] == pytest.approx(math.sqrt(0.02))
    assert out["none"]["len"] == {"mean": 11.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert "name" not in out["none"]  # non-numeric keys are skipped
    assert out["VHR"]["chair_s"]["std"] == 0.0 and out["VHR"]["chair_s"]["n"] == 1


def test_bad_input() -> None:
    with pytest.raises(MetricInputError, match="no seed"):
        aggregate_seeds({"none": []})
    with pytest.raises(MetricInputError, match="missing"):
        aggregate_seeds({"none": [{"a": 1.0}, {}]}, metrics=["a"])
