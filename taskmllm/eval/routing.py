"""Task-token routing accuracy: did the model emit the task tokens (``<seg>``, ``<det>``, ``<track>``) it should?

A sample is correct when its emitted task-token sequence equals the expected one exactly (same tokens,
same order, same count). Per task, emitted and expected tokens are matched as multisets within each
sample: ``tp = Σ min(#expected, #emitted)``, precision = tp / #emitted, recall = tp / #expected
(0.0 where the denominator is 0, as scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import check_same_length

__all__ = ["routing_accuracy"]


def routing_accuracy(expected: Sequence[Sequence[str]], emitted: Sequence[Sequence[str]]) -> dict[str, object]:
    """Fraction of samples whose emitted task tokens equal the expected ones, plus per-task precision/recall.

    Args:
        expected: per sample the task tokens the model should emit, in order (``[]`` for plain answers).
        emitted: per sample the task tokens the model emitted, in order.

    Returns:
        ``{"accuracy": float, "correct": int, "n": int,
        "per_task": {token: {"precision": float, "recall": float, "f1": float, "support": int,
        "emitted": int}}}`` where ``support`` counts expected occurrences; tasks appearing in either
        side are listed.

    Raises:
        MetricInputError: lengths differ, no samples, or a sample is a bare string instead of a list.
    """
    n = check_same_length("expected", expected, "emitted", emitted)
    if n == 0:
        raise MetricInputError("routing accuracy over zero samples is undefined")
    correct = 0
    tp: Counter[str] = Counter()
    n_expected: Counter[str] = Counter()
    n_emitted: Counter[str] = Counter()
    for i, (exp, emi) in enumerate(zip(expected, emitted)):
        if isinstance(exp, str) or isinstance(emi, str):
            raise MetricInputError(f"sample {i}: task tokens must be a list of strings, not one string")
        exp_list, emi_list = list(exp), list(emi)
        correct += exp_list == emi_list
        ce, cm = Counter(exp_list), Counter(emi_list)
        n_expected.update(ce)
        n_emitted.update(cm)
        tp.update(ce & cm)
    per_task: dict[str, dict[str, float]] = {}
    for task in sorted(set(n_expected) | set(n_emitted)):
        precision = tp[task] / n_emitted[task] if n_emitted[task] else 0.0
        recall = tp[task] / n_expected[task] if n_expected[task] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        per_task[task] = {"precision": precision, "recall": recall, "f1": f1, "support": n_expected[task],
                          "emitted": n_emitted[task]}
    return {"accuracy": correct / n, "correct": correct, "n": n, "per_task": per_task}
