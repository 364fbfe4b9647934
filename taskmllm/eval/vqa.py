"""VQA exact-match accuracy with a light answer normalization.

:func:`normalize_answer` lowercases, trims, collapses internal whitespace, strips trailing punctuation
(``. , ! ? ; :``) and maps number words to digits token by token (``"Two."`` → ``"2"``, ``"twenty"`` →
``"20"``, zero to twenty). It does not drop articles or rephrase: "there are two" ≠ "2".
"""

from __future__ import annotations

from collections.abc import Sequence

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import check_same_length

__all__ = ["normalize_answer", "vqa_accuracy"]

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
_TRAILING_PUNCTUATION = ".,!?;:"


def normalize_answer(answer: str) -> str:
    """Canonical form of a short answer for exact matching (see module doc)."""
    if not isinstance(answer, str):
        raise MetricInputError(f"VQA answer must be a string, got {type(answer).__name__}")
    text = " ".join(answer.lower().split()).rstrip(_TRAILING_PUNCTUATION).strip()
    tokens = [str(_NUMBER_WORDS.index(t)) if t in _NUMBER_WORDS else t for t in text.split(" ")]
    return " ".join(tokens)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
                 question_types: Sequence[str] | None = None) -> dict[str, object]:
    """Exact-match accuracy after :func:`normalize_answer`.

    Args:
        predictions: one answer per question.
        answers: per question the reference answer, or a list of acceptable answers (any match counts).
        question_types: optional per-question type (e.g. "existence", "color", "count") for a breakdown.

    Returns:
        ``{"accuracy": float, "correct": int, "n": int}`` and, with ``question_types``,
        ``"by_type": {type: {"accuracy": float, "correct": int, "n": int}}``.

    Raises:
        MetricInputError: lengths differ, no questions, an answer list is empty or holds a non-string.
    """
    n = check_same_length("predictions", predictions, "answers", answers)
    if n == 0:
        raise MetricInputError("VQA accuracy over zero questions is undefined")
    if question_types is not None:
        check_same_length("question_types", question_types, "answers", answers)
    hits: list[bool] = []
    for i, (pred, ref) in enumerate(zip(predictions, answers)):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise MetricInputError(f"question {i} has an empty list of reference answers")
        accepted = {normalize_answer(r) for r in refs}
        hits.append(normalize_answer(pred) in accepted)
    correct = sum(hits)
    out: dict[str, object] = {"accuracy": correct / n, "correct": correct, "n": n}
    if question_types is not None:
        by_type: dict[str, dict[str, float]] = {}
        for qtype in sorted(set(question_types)):
            group = [h for h, t in zip(hits, question_types) if t == qtype]
            by_type[qtype] = {"accuracy": sum(group) / len(group), "correct": sum(group), "n": len(group)}
        out["by_type"] = by_type
    return out
