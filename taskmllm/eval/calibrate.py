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

``interventions.json`` beside the model holds, per intervention (``"vhr"``, ``"var"``, ``"zerotuning"``), its
settings (the constructor arguments, :meth:`VHR.settings` etc.) and the calibration record; :func:`save_calibration`
writes it atomically (merging with what is there) and :func:`load_calibration` reads it strictly (typed errors on
a malformed file; unknown names or settings are rejected by constructing each intervention).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from taskmllm.model.interventions.validation import check_number

FILENAME = "interventions.json"
FORMAT = "taskmllm-interventions"
VERSION = 1
INTERVENTION_TYPES: dict[str, type] = {"vhr": VHR, "var": VAR, "zerotuning": ZeroTuning}
#: the identity settings of each intervention: what a calibration stores when no candidate helps
IDENTITY: dict[str, dict[str, Any]] = {"vhr": {"alpha": 1.0}, "var": {"p": 0.0}, "zerotuning": {"gamma": 1.0}}
Intervention = Union[VHR, VAR, ZeroTuning]
Metrics = Mapping[str, float]


def build_intervention(name: str, settings: Mapping[str, Any]) -> Intervention:
    """``("vhr" | "var" | "zerotuning", settings)`` -> the intervention object (settings checked strictly)."""
    cls = INTERVENTION_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"unknown intervention {name!r}; known: {sorted(INTERVENTION_TYPES)}")
    return cls.from_settings(settings)


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


# ------------------------------------------------------------------------------------- interventions.json
def _path(model_dir: Union[str, Path]) -> Path:
    return Path(model_dir) / FILENAME


def save_calibration(model_dir: Union[str, Path], settings: Mapping[str, Mapping[str, Any]],
                     records: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Path:
    """Write (merge) ``{name: settings}`` and optional ``{name: record}`` into ``model_dir/interventions.json``.

    Settings are checked by building each intervention first; the file is replaced atomically (a temporary
    sibling, fsynced, then renamed), so a crash leaves the old file or the new one, never half of one.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(model_dir, "is not a model directory")
    entries = {name: {"settings": build_intervention(name, s).settings()} for name, s in settings.items()}
    for name, record in (records or {}).items():
        if name not in entries:
            raise ConfigError(f"a calibration record for {name!r} needs its settings too")
        entries[name]["calibration"] = json.loads(json.dumps(record))  # JSON-able, copied
    current = load_calibration(model_dir, raw=True) if _path(model_dir).exists() else {}
    current.update(entries)
    payload = {"format": FORMAT, "version": VERSION, "interventions": current}
    fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, _path(model_dir))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _path(model_dir)


def load_calibration(model_dir: Union[str, Path], raw: bool = False) -> dict[str, Any]:
    """The calibrated settings ``{name: settings}`` of a model directory (``{}`` when it has no
    ``interventions.json``); ``raw=True`` returns the stored entries (settings and calibration records).

    Raises:
        CheckpointError: the file is not JSON, of another format or version, or malformed; an unknown
            intervention name or setting (each is checked by building the intervention).
    """
    path = _path(model_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"cannot read the intervention calibration: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(path, f"not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise CheckpointError(path, f"version {data.get('version')!r} is not supported (expected {VERSION})")
    entries = data.get("interventions")
    if not isinstance(entries, dict):
        raise CheckpointError(path, "'interventions' must be an object")
    out: dict[str, Any] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise CheckpointError(path, f"entry {name!r} must be an object with 'settings'")
        extra = sorted(set(entry) - {"settings", "calibration"})
        if extra:
            raise CheckpointError(path, f"entry {name!r} has unknown keys {extra}")
        try:
            settings = build_intervention(name, entry["settings"]).settings()
        except ConfigError as exc:
            raise CheckpointError(path, f"entry {name!r}: {exc}") from exc
        out[name] = dict(entry, settings=settings) if raw else settings
    return out


def load_interventions(model_dir: Union[str, Path]) -> dict[str, Intervention]:
    """The calibrated interventions of a model directory, built (``{}`` without ``interventions.json``)."""
    return {name: build_intervention(name, s) for name, s in load_calibration(model_dir).items()}
