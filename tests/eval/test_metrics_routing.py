"""Task-token routing accuracy and per-task precision / recall."""

from __future__ import annotations

import pytest

from taskmllm.errors import MetricInputError
from taskmllm.eval.routing import routing_accuracy


def test_routing_hand_computed() -> None:
    expected = [["<seg>"], ["<det>"], [], ["<seg>", "<det>"]]
    emitted = [["<seg>"], ["<seg>"], [], ["<det>", "<seg>"]]
    out = routing_accuracy(expected, emitted)
    # exact sequence match: samples 0 and 2 (sample 3 has the right tokens in the wrong order) -> 2/4
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["correct"] == 2 and out["n"] == 4
    # <seg>: expected in samples 0, 3 (2); emitted in 0, 1, 3 (3); matched 0, 3 -> P 2/3, R 2/2
    seg = out["per_task"]["<seg>"]
    assert (seg["precision"], seg["recall"], seg["support"], seg["emitted"]) == (pytest.approx(2 / 3), 1.0, 2, 3)
    assert seg["f1"] == pytest.approx(0.8)  # 2 * (2/3) * 1 / (5/3)
    # <det>: expected in 1, 3 (2); emitted in 3 (1); matched 3 -> P 1, R 1/2
    det = out["per_task"]["<det>"]
    assert (det["precision"], det["recall"]) == (1.0, 0.5)


def test_repeated_tokens_count_as_multisets() -> None:
    out = routing_accuracy([["<det>", "<det>"]], [["<det>"]])
    assert out["accuracy"] == 0.0
    assert out["per_task"]["<det>"]["recall"] == 0.5 and out["per_task"]["<det>"]["precision"] == 1.0


def test_never_emitted_task_has_zero_precision() -> None:
    out = routing_accuracy([["<track>"]], [[]])
    assert out["per_task"]["<track>"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "emitted": 0}


def test_bad_input() -> None:
    with pytest.raises(MetricInputError):
        routing_accuracy([["<seg>"]], [])
    with pytest.raises(MetricInputError, match="list of strings"):
        routing_accuracy(["<seg>"], [["<seg>"]])  # type: ignore[list-item]
    with pytest.raises(MetricInputError):
        routing_accuracy([], [])
