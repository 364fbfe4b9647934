"""Object-hallucination metrics: POPE (yes/no probing) and CHAIR (objects mentioned in captions).

POPE answers are parsed exactly as LLaVA's ``llava/eval/eval_pope.py`` does (read in the official code):

1. if the text contains ``'.'``, keep only the part before the first ``'.'``;
2. delete commas;
3. split on single spaces (``text.split(' ')``);
4. the answer is "no" if one of the words is exactly ``'No'``, ``'not'`` or ``'no'``, otherwise "yes".

The official rule does **not** lowercase — ``"NO"``, ``"Not"`` or ``"No!"`` parse as "yes" — and an
empty answer parses as "yes". :func:`pope_parse` reproduces it bit for bit; ``lowercase=True`` is an
opt-in variant (some forks lowercase first) that is *not* comparable with published LLaVA numbers.

CHAIR (Rohrbach et al., 2018) counts object mentions found with a vocabulary of canonical object names
and their synonyms. ``CHAIR_S`` = captions with ≥ 1 hallucinated object / captions; ``CHAIR_I`` =
hallucinated mentions / all mentions (every occurrence counts, as in the original code); ``recall`` =
ground-truth objects mentioned at least once / ground-truth objects (summed over captions).
All results are fractions in ``[0, 1]``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from taskmllm.errors import MetricInputError
from taskmllm.eval.geometry import check_same_length

__all__ = ["ChairVocabulary", "chair", "pope_metrics", "pope_parse", "pope_summary", "simple_plural"]

PopeAnswer = Literal["yes", "no"]

_NO_WORDS = frozenset({"No", "not", "no"})


# ----------------------------------------------------------------------------------------------- POPE


def pope_parse(text: str, lowercase: bool = False) -> PopeAnswer:
    """Map a free-form answer to "yes" or "no" with LLaVA's ``eval_pope.py`` rule (see module doc)."""
    if not isinstance(text, str):
        raise MetricInputError(f"POPE answer must be a string, got {type(text).__name__}")
    if lowercase:
        text = text.lower()
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in _NO_WORDS for w in words) else "yes"


def _label(label: str | bool, index: int) -> bool:
    if isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower() == "yes"
    raise MetricInputError(f"POPE label {index} must be 'yes', 'no' or a bool; got {label!r}")


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else 0.0


def pope_metrics(answers: Sequence[str], labels: Sequence[str | bool], lowercase: bool = False) -> dict[str, float]:
    """POPE scores of one split: free-form ``answers`` against ``labels`` ("yes"/"no" or booleans).

    "yes" is the positive class. Where LLaVA would divide by zero (no "yes" predicted, so precision is
    undefined; or precision + recall = 0) the value is 0.0.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio"}`` as fractions, plus the counts
        ``"tp", "fp", "tn", "fn", "n"``.

    Raises:
        MetricInputError: lengths differ, the split is empty, an answer is not a string, a label is
            not yes/no.
    """
    n = check_same_length("answers", answers, "labels", labels)
    if n == 0:
        raise MetricInputError("POPE split is empty")
    preds = [pope_parse(a, lowercase) == "yes" for a in answers]
    truth = [_label(lab, i) for i, lab in enumerate(labels)]
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    tn = sum((not p) and (not t) for p, t in zip(preds, truth))
    fn = sum((not p) and t for p, t in zip(preds, truth))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def pope_summary(splits: Mapping[str, tuple[Sequence[str], Sequence[str | bool]]],
                 lowercase: bool = False) -> dict[str, object]:
    """POPE over several splits (random / popular / adversarial): per-split scores and their means.

    Args:
        splits: split name -> ``(answers, labels)``.

    Returns:
        ``{"splits": {name: pope_metrics(...)}, "mean_f1": float, "mean_accuracy": float,
        "mean_yes_ratio": float}`` — LLaVA reports the mean F1 over the three splits.
    """
    if not splits:
        raise MetricInputError("pope_summary needs at least one split")
    per_split = {name: pope_metrics(ans, lab, lowercase) for name, (ans, lab) in splits.items()}
    k = len(per_split)
    return {
        "splits": per_split,
        "mean_f1": sum(m["f1"] for m in per_split.values()) / k,
        "mean_accuracy": sum(m["accuracy"] for m in per_split.values()) / k,
        "mean_yes_ratio": sum(m["yes_ratio"] for m in per_split.values()) / k,
    }


# ---------------------------------------------------------------------------------------------- CHAIR


def simple_plural(word: str) -> str:
    """English plural of a (last) noun by the regular rules: box→boxes, sky→skies, circle→circles."""
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


@dataclass(frozen=True)
class ChairVocabulary:
    """Object vocabulary for CHAIR: canonical name -> synonyms, compiled into one matcher.

    Build it with :meth:`from_synonyms`. Matching is case-insensitive, on word boundaries (letters and
    digits; a hyphen or punctuation separates words), multi-word synonyms match across any whitespace,
    and at each position the longest synonym wins ("traffic light" before "light"); matches do not
    overlap. The canonical name is always one of its own synonyms.
    """

    canonical_of: Mapping[str, str]
    pattern: re.Pattern[str]

    @classmethod
    def from_synonyms(cls, synonyms: Mapping[str, Collection[str]], add_plurals: bool = True) -> ChairVocabulary:
        """Compile ``{canonical: [synonym, ...]}``; with ``add_plurals`` regular plurals are added too.

        Raises:
            MetricInputError: the mapping is empty, a synonym is blank, or one synonym names two objects.
        """
        if not synonyms:
            raise MetricInputError("CHAIR vocabulary is empty")
        canonical_of: dict[str, str] = {}
        for canonical, words in synonyms.items():
            if isinstance(words, str):
                raise MetricInputError(f"synonyms of {canonical!r} must be a list of strings, not one string")
            for form in (canonical, *words):
                key = " ".join(str(form).lower().split())
                if not key:
                    raise MetricInputError(f"blank synonym for {canonical!r}")
                if canonical_of.get(key, canonical) != canonical:
                    raise MetricInputError(f"synonym {key!r} names both {canonical_of[key]!r} and {canonical!r}")
                canonical_of[key] = canonical
        if add_plurals:  # generated plurals never override a synonym given explicitly
            for key, canonical in list(canonical_of.items()):
                canonical_of.setdefault(simple_plural(key), canonical)
        ordered = sorted(canonical_of, key=lambda s: (-len(s), s))
        alternatives = "|".join(r"\s+".join(re.escape(part) for part in s.split(" ")) for s in ordered)
        pattern = re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])", re.IGNORECASE)
        return cls(canonical_of=MappingProxyType(canonical_of), pattern=pattern)

    @property
    def objects(self) -> frozenset[str]:
        """The canonical object names."""
        return frozenset(self.canonical_of.values())

    def extract(self, caption: str) -> list[str]:
        """Canonical names of all object mentions in ``caption``, in order, repeats included."""
        return [self.canonical_of[" ".join(m.group(0).lower().split())] for m in self.pattern.finditer(caption)]


def chair(captions: Sequence[str], gt_objects: Sequence[Collection[str]],
          vocabulary: ChairVocabulary | Mapping[str, Collection[str]]) -> dict[str, object]:
    """CHAIR_S, CHAIR_I, recall and mean length of captions against the objects present per image.

    Args:
        captions: one generated caption per image.
        gt_objects: per image the canonical names of the objects present (any collection; repeats ignored).
        vocabulary: a :class:`ChairVocabulary`, or a ``{canonical: [synonyms...]}`` mapping compiled with
            regular plurals added.

    Returns:
        ``{"chair_s", "chair_i", "recall", "mean_length"}`` plus counts ``"n_captions",
        "n_mentions", "n_hallucinated_mentions", "n_hallucinated_captions"`` and
        ``"per_caption": [{"mentioned": [...], "hallucinated": [...]}]``. ``chair_i`` is 0.0 when no
        object is mentioned at all; ``recall`` is 0.0 when no image has a ground-truth object.
        ``mean_length`` counts whitespace-separated words.

    Raises:
        MetricInputError: lengths differ, no captions, or a ground-truth object outside the vocabulary.
    """
    vocab = vocabulary if isinstance(vocabulary, ChairVocabulary) else ChairVocabulary.from_synonyms(vocabulary)
    n = check_same_length("captions", captions, "gt_objects", gt_objects)
    if n == 0:
        raise MetricInputError("CHAIR needs at least one caption")
    known = vocab.objects
    n_mentions = n_halluc = n_halluc_caps = gt_total = gt_found = words = 0
    per_caption: list[dict[str, list[str]]] = []
    for i, (caption, present) in enumerate(zip(captions, gt_objects)):
        if not isinstance(caption, str):
            raise MetricInputError(f"caption {i} must be a string, got {type(caption).__name__}")
        gt = set(present)
        unknown = gt - known
        if unknown:
            raise MetricInputError(f"caption {i}: ground-truth objects {sorted(unknown)} are not in the vocabulary")
        mentioned = vocab.extract(caption)
        hallucinated = [m for m in mentioned if m not in gt]
        n_mentions += len(mentioned)
        n_halluc += len(hallucinated)
        n_halluc_caps += bool(hallucinated)
        gt_total += len(gt)
        gt_found += len(gt & set(mentioned))
        words += len(caption.split())
        per_caption.append({"mentioned": mentioned, "hallucinated": hallucinated})
    return {
        "chair_s": n_halluc_caps / n,
        "chair_i": n_halluc / n_mentions if n_mentions else 0.0,
        "recall": gt_found / gt_total if gt_total else 0.0,
        "mean_length": words / n,
        "n_captions": n,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_halluc,
        "n_hallucinated_captions": n_halluc_caps,
        "per_caption": per_caption,
    }
