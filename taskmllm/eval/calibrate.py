"""Calibrating an intervention's settings per model: a grid search over a scoring callback, and the model's
``interventions.json``.

Objective (:class:`Objective`, stated and stored with the result): on a validation suite,

    score = POPE accuracy - chair_weight * CHAIR_S            (default chair_weight = 1)

subject to caption recall not dropping more than ``max_recall_drop`` (default 0.02) below the plain model's. The
plain model (no intervention) is always scored first; a candidate is chosen only when it is feasible and beats the
plain model's score by at least ``min_gain`` (default 0.01: on a validation suite of a few hundred questions a
smaller gain is noise); otherwise the result's ``best`` is None (the calibration says: leave the model alone).

:func:`grid_search` knows no data set: ``evaluate(intervention_or_None)`` returns the metrics (by default the keys
``pope_accuracy``, ``chair_s`` and ``recall``), so ShapesWorld's val world, real POPE/CHAIR files or a stub can
drive it. The grids (:func:`vhr_grid`, :func:`var_grid`, :func:`zerotuning_grid`) scale with the model (layer sets
as fractions of depth), so nothing is transplanted from 32-layer LLaVA.

``interventions.json`` beside the model (the settings and the calibration record) is read and written by
:mod:`taskmllm.model.interventions.calibrated` (re-exported here): the model layer owns the file, so ``Pipeline``
reads it without importing evaluation code. ``taskmllm calibrate`` runs the grids on ShapesWorld's ``val`` world
(:mod:`taskmllm.eval.calibration_run`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from taskmllm.errors import ConfigError
from taskmllm.model.interventions.calibrated import (FILENAME, IDENTITY, INTERVENTION_TYPES, Intervention,
                                                     build_intervention, load_calibration, load_interventions,
                                                     save_calibration)
from taskmllm.model.interventions.validation import check_number

__all__ = ["FILENAME", "IDENTITY", "INTERVENTION_TYPES", "LAYER_SETS", "CalibrationResult", "Objective",
           "build_intervention", "grid_search", "layer_set", "load_calibration", "load_interventions",
           "save_calibration", "var_grid", "vhr_grid", "zerotuning_grid"]

Metrics = Mapping[str, float]


@dataclass(frozen=True)
class Objective:
    """``score = metrics[accuracy_key] - chair_weight * metrics[penalty_key]``; a candidate is infeasible when
    ``metrics[recall_key]`` is more than ``max_recall_drop`` below the baseline's, and is chosen only when its score
    beats the baseline's by at least ``min_gain``."""

    chair_weight: float = 1.0
    max_recall_drop: float = 0.02
    min_gain: float = 0.01
    accuracy_key: str = "pope_accuracy"
    penalty_key: str = "chair_s"
    recall_key: str = "recall"

    def __post_init__(self) -> None:
        check_number("Objective", "chair_weight", self.chair_weight, 0.0, None)
        check_number("Objective", "max_recall_drop", self.max_recall_drop, 0.0, 1.0)
        check_number("Objective", "min_gain", self.min_gain, 0.0, None)

    def score(self, metrics: Metrics) -> float:
        """The objective's value (no feasibility check)."""
        return float(self._get(metrics, self.accuracy_key)) - self.chair_weight * float(
            self._get(metrics, self.penalty_key))

    def feasible(self, metrics: Metrics, baseline: Metrics) -> bool:
        """Caption recall within ``max_recall_drop`` of the baseline's."""
        drop = float(self._get(baseline, self.recall_key)) - float(self._get(metrics, self.recall_key))
        return drop <= self.max_recall_drop + 1e-12

    @staticmethod
    def _get(metrics: Metrics, key: str) -> float:
        if key not in metrics:
            raise ConfigError(f"the evaluation returned no {key!r} (got {sorted(metrics)})")
        value = float(metrics[key])
        if not math.isfinite(value):
            raise ConfigError(f"the evaluation returned {key}={value}")
        return value


@dataclass
class CalibrationResult:
    """A grid search's outcome.

    Attributes:
        intervention: ``"vhr"``, ``"var"`` or ``"zerotuning"``.
        best: the chosen settings, or None when no feasible candidate beats the plain model.
        best_score: its objective value (the baseline's when ``best`` is None).
        baseline: the plain model's metrics and ``baseline_score`` its objective value.
        table: one row per candidate, in grid order: ``{"settings", "metrics", "score", "feasible"}``.
        objective: the objective used.
    """

    intervention: str
    best: Optional[dict[str, Any]]
    best_score: float
    baseline: dict[str, float]
    baseline_score: float
    table: list[dict[str, Any]] = field(default_factory=list)
    objective: Objective = field(default_factory=Objective)

    def chosen(self) -> dict[str, Any]:
        """The settings to store: ``best``, or the intervention's identity settings when nothing beat the plain
        model (so a model that carries the calibration runs unchanged instead of with uncalibrated defaults)."""
        return dict(self.best) if self.best is not None else build_intervention(
            self.intervention, IDENTITY[self.intervention]).settings()

    def record(self) -> dict[str, Any]:
        """What :func:`save_calibration` stores beside the settings (JSON-able)."""
        return {"objective": asdict(self.objective), "score": self.best_score, "baseline": dict(self.baseline),
                "baseline_score": self.baseline_score, "candidates": len(self.table)}


def grid_search(intervention: str, candidates: Sequence[Mapping[str, Any]],
                evaluate: Callable[[Optional[Intervention]], Metrics], objective: Objective = Objective(),
                progress: Optional[Callable[[int, int, dict[str, Any]], None]] = None) -> CalibrationResult:
    """Score the plain model and every candidate setting; pick the best feasible one that beats the plain model by
    at least ``objective.min_gain``.

    Args:
        intervention: ``"vhr"``, ``"var"`` or ``"zerotuning"``.
        candidates: settings dicts (constructor arguments); all are checked before anything runs.
        evaluate: runs the validation suite under an intervention (None = plain model), returns its metrics.
        objective: the :class:`Objective`.
        progress: optional ``progress(i, n, row)`` after each candidate.

    Returns:
        :class:`CalibrationResult` (ties go to the earlier candidate).
    """
    if not candidates:
        raise ConfigError("grid_search needs at least one candidate setting")
    built = [build_intervention(intervention, c) for c in candidates]  # every setting is valid before we spend
    baseline = {k: float(v) for k, v in evaluate(None).items()}
    base_score = objective.score(baseline)
    table: list[dict[str, Any]] = []
    best, best_score = None, base_score
    for i, obj in enumerate(built):
        metrics = {k: float(v) for k, v in evaluate(obj).items()}
        row = {"settings": obj.settings(), "metrics": metrics, "score": objective.score(metrics),
               "feasible": objective.feasible(metrics, baseline)}
        table.append(row)
        better = row["score"] > best_score if best is not None else row["score"] >= base_score + objective.min_gain
        if row["feasible"] and better:
            best, best_score = row["settings"], row["score"]
        if progress is not None:
            progress(i + 1, len(built), row)
    return CalibrationResult(intervention, best, best_score, baseline, base_score, table, objective)


# ------------------------------------------------------------------------------------------------ grids
#: layer sets as fractions of an N-layer LM: (name, first layer as a fraction of N, include layer 1)
LAYER_SETS: dict[str, tuple[float, bool]] = {"paper": (1 - 14 / 32, True), "late-half": (0.5, False),
                                             "late-quarter": (0.75, False), "middle-on": (0.25, False),
                                             "all": (0.0, False)}


def layer_set(name: str, num_layers: int) -> list[int]:
    """A named layer set for an ``num_layers``-layer LM (``"paper"`` is VHR's layer 1 + last 14/32)."""
    if name not in LAYER_SETS:
        raise ConfigError(f"unknown layer set {name!r}; known: {sorted(LAYER_SETS)}")
    start_fraction, with_one = LAYER_SETS[name]
    start = min(num_layers - 1, round(start_fraction * num_layers))
    return sorted(set(range(start, num_layers)) | ({min(1, num_layers - 1)} if with_one else set()))


def vhr_grid(num_layers: int, alphas: Sequence[float] = (1.25, 1.5, 2.0),
             layer_sets: Sequence[str] = ("paper", "late-half", "late-quarter"),
             remove_outliers: Sequence[bool] = (True,)) -> list[dict[str, Any]]:
    """VHR candidates: alpha x layer set (deduplicated when two named sets coincide on a shallow model)."""
    seen, out = set(), []
    for name in layer_sets:
        layers = layer_set(name, num_layers)
        for alpha in alphas:
            for ro in remove_outliers:
                key = (tuple(layers), float(alpha), ro)
                if key not in seen:
                    seen.add(key)
                    out.append({"alpha": float(alpha), "layers": layers, "remove_outliers": ro})
    return out


def var_grid(ps: Sequence[float] = (0.2, 0.4, 0.6), rhos: Sequence[float] = (0.3, 0.5, 0.8),
             taus: Sequence[Optional[float]] = (None,), mode: str = "official",
             sink_dims: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """VAR candidates: p x rho x tau (None = the per-model default tau) in one mode."""
    return [{"mode": mode, "p": float(p), "rho": float(r), "tau": t,
             "sink_dims": None if sink_dims is None else list(sink_dims)}
            for p in ps for r in rhos for t in taus]


def zerotuning_grid(head_sets: Mapping[str, Sequence[Sequence[int]]],
                    gammas: Sequence[float] = (0.5, 0.75, 1.25, 1.5, 2.0)) -> list[dict[str, Any]]:
    """ZeroTuning candidates: each head set (e.g. a profile's ``"up"`` / ``"down"`` heads, or all heads) x gamma;
    an up-effective set gets gammas > 1 only, a down-effective set gammas < 1 only (by the set's name)."""
    out = []
    for name, heads in head_sets.items():
        if not heads:
            continue
        side = [g for g in gammas if g > 1] if name == "up" else [g for g in gammas if g < 1] if name == "down" \
            else list(gammas)
        out += [{"gamma": float(g), "heads": [list(map(int, h)) for h in heads]} for g in side if g != 1.0]
    return out
