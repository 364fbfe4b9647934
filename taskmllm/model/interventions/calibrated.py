"""A model's calibrated intervention settings (``interventions.json`` beside its weights) and named interventions
resolved against them.

``interventions.json`` holds, per intervention (``"vhr"``, ``"var"``, ``"zerotuning"``), its settings (the
constructor arguments, :meth:`VHR.settings` etc.) and optionally the record of the calibration that chose them
(``taskmllm calibrate``, :mod:`taskmllm.eval.calibration_run`)::

    {"format": "taskmllm-interventions", "version": 1,
     "interventions": {"vhr": {"settings": {"alpha": 1.25, "layers": [3], "remove_outliers": true},
                               "calibration": {"objective": {...}, "score": 0.73, ...},
                               "weights": {"model.safetensors": "0daa2343..."}}}}

``weights`` (written by ``taskmllm calibrate``) is the SHA-256 of each weight file the settings were chosen on
(:func:`weights_fingerprint`: the checkpoint's ``checksums.json`` outside ``experts/``). Settings calibrated on
other weights are not settings for this model: when the model's files differ, :func:`load_calibration` drops the
entry with a :class:`~taskmllm.errors.StaleCalibrationWarning`, and the intervention runs with its defaults until
calibrated again.

:func:`save_calibration` writes it atomically (merging with what is there); :func:`load_calibration` reads it
strictly (typed errors on a malformed file; unknown names or settings are rejected by constructing each
intervention). :func:`make_intervention` turns a name into an object: ``"vhr"`` is VHR with the model's calibrated
settings when it carries them, else VHR's defaults; keyword overrides replace single settings.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from taskmllm.errors import CheckpointError, ConfigError, StaleCalibrationWarning
from taskmllm.model.interventions.var import VAR
from taskmllm.model.interventions.vhr import VHR
from taskmllm.model.interventions.zerotuning import ZeroTuning
from taskmllm.model.io import atomic_write_text, read_checksums

FILENAME = "interventions.json"
FORMAT = "taskmllm-interventions"
VERSION = 1
INTERVENTION_TYPES: dict[str, type] = {"vhr": VHR, "var": VAR, "zerotuning": ZeroTuning}
#: every name ``intervention=`` accepts (``"none"`` = the plain model)
NAMES: tuple[str, ...] = ("none", *INTERVENTION_TYPES)
#: the identity settings of each intervention: what a calibration stores when no candidate helps
IDENTITY: dict[str, dict[str, Any]] = {"vhr": {"alpha": 1.0}, "var": {"p": 0.0}, "zerotuning": {"gamma": 1.0}}
Intervention = Union[VHR, VAR, ZeroTuning]
Settings = Mapping[str, Mapping[str, Any]]
ENTRY_KEYS = ("settings", "calibration", "weights")


def build_intervention(name: str, settings: Mapping[str, Any]) -> Intervention:
    """``("vhr" | "var" | "zerotuning", settings)`` -> the intervention object (settings checked strictly)."""
    cls = INTERVENTION_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"unknown intervention {name!r}; known: {sorted(INTERVENTION_TYPES)}")
    return cls.from_settings(settings)


def make_intervention(name: Optional[str], calibrated: Optional[Settings] = None,
                      **overrides: Any) -> Optional[Intervention]:
    """A named intervention with a model's calibrated settings.

    Args:
        name: ``"none"`` / None (no intervention), ``"vhr"``, ``"var"`` or ``"zerotuning"`` (any case).
        calibrated: ``{name: settings}`` of the model (:func:`load_calibration`); a name without an entry gets the
            intervention's defaults (VHR alpha 2 on the depth-scaled paper layers, VAR official mode, ZeroTuning
            gamma 1: the identity until calibrated).
        overrides: single settings that replace the calibrated/default ones (``alpha=1.5``, ``p=0.3``, ``tau=4``);
            None values are ignored, so callers may pass every control they have.

    Raises:
        ConfigError: an unknown name, an unknown or out-of-range setting, or ``gamma`` for a ZeroTuning calibrated
            with per-head gammas.
    """
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"an intervention name must be a string, got {name!r}")
    key = (name or "none").lower()
    if key == "none":
        return None
    if key not in INTERVENTION_TYPES:
        raise ConfigError(f"unknown intervention {name!r}; known: {list(NAMES)}")
    settings = dict((calibrated or {}).get(key) or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    if key == "zerotuning" and "gamma" in given and settings.get("gammas") is not None:
        raise ConfigError("this model's ZeroTuning calibration has per-head gammas; a single gamma cannot replace "
                          "them (pass a ZeroTuning object instead)")
    return build_intervention(key, {**settings, **given})


# ------------------------------------------------------------------------------------- interventions.json
def calibration_path(model_dir: Union[str, Path]) -> Path:
    """``model_dir/interventions.json``."""
    return Path(model_dir) / FILENAME


def weights_fingerprint(model_dir: Union[str, Path]) -> dict[str, str]:
    """``{file: SHA-256}`` of the weights a calibration of the checkpoint ``model_dir`` is made on: its
    ``checksums.json`` entries outside ``experts/`` (an intervention acts on the LLM, never on an expert head);
    ``{}`` for a checkpoint written without checksums.

    Raises:
        CheckpointError: an unreadable ``checksums.json``.
    """
    return {name: digest for name, digest in read_checksums(model_dir).items() if not name.startswith("experts/")}


def save_calibration(model_dir: Union[str, Path], settings: Settings,
                     records: Optional[Mapping[str, Mapping[str, Any]]] = None,
                     weights: Optional[Mapping[str, str]] = None) -> Path:
    """Write (merge) ``{name: settings}`` and optional ``{name: record}`` into ``model_dir/interventions.json``,
    each entry with the ``weights`` (:func:`weights_fingerprint`) it was calibrated on when given.

    Settings are checked by building each intervention first; the file is replaced atomically (a temporary
    sibling, fsynced, then renamed), so a crash leaves the old file or the new one, never half of one.

    Raises:
        CheckpointError: ``model_dir`` is not a directory. ConfigError: a bad setting, or a record without settings.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(model_dir, "is not a model directory")
    entries = {name: {"settings": build_intervention(name, s).settings()} for name, s in settings.items()}
    if weights:
        for entry in entries.values():
            entry["weights"] = dict(weights)  # written with sorted keys, like the rest of the file
    for name, record in (records or {}).items():
        if name not in entries:
            raise ConfigError(f"a calibration record for {name!r} needs its settings too")
        entries[name]["calibration"] = json.loads(json.dumps(record))  # JSON-able, copied
    current = load_calibration(model_dir, raw=True) if calibration_path(model_dir).exists() else {}
    current.update(entries)
    payload = {"format": FORMAT, "version": VERSION, "interventions": current}
    return atomic_write_text(calibration_path(model_dir), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_calibration(model_dir: Union[str, Path], raw: bool = False,
                     weights: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The calibrated settings ``{name: settings}`` of a model directory (``{}`` when it has no
    ``interventions.json``); ``raw=True`` returns the stored entries (settings, calibration records, weights).

    ``weights``: the model's :func:`weights_fingerprint`; an entry calibrated on other weights is left out with a
    :class:`StaleCalibrationWarning` (an entry that records no weights, or a call without ``weights``, is kept).

    Raises:
        CheckpointError: the file is not JSON, of another format or version, or malformed; an unknown
            intervention name or setting (each is checked by building the intervention).
    """
    path = calibration_path(model_dir)
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
        extra = sorted(set(entry) - set(ENTRY_KEYS))
        if extra:
            raise CheckpointError(path, f"entry {name!r} has unknown keys {extra}")
        try:
            settings = build_intervention(name, entry["settings"]).settings()
        except ConfigError as exc:
            raise CheckpointError(path, f"entry {name!r}: {exc}") from exc
        if _stale(path, name, entry.get("weights"), weights):
            continue
        out[name] = dict(entry, settings=settings) if raw else settings
    return out


def _stale(path: Path, name: str, stored: Any, current: Optional[Mapping[str, str]]) -> bool:
    """Whether the entry ``name`` was calibrated on other weights than ``current`` (then it warns, naming the
    files that differ, were added or went missing)."""
    if stored is None:
        return False
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise CheckpointError(path, f"entry {name!r}: 'weights' must map file names to SHA-256 hex digests")
    if current is None or stored == dict(current):
        return False
    changed = sorted(f for f in set(stored) | set(current) if stored.get(f) != current.get(f))
    warnings.warn(f"{path}: the {name!r} settings were calibrated on other weights ({', '.join(changed)} "
                  f"changed): they are not used, and {name} runs with its defaults until `taskmllm calibrate "
                  f"--intervention {name}` is run for this model", StaleCalibrationWarning, stacklevel=3)
    return True


def load_interventions(model_dir: Union[str, Path]) -> dict[str, Intervention]:
    """The calibrated interventions of a model directory, built (``{}`` without ``interventions.json``)."""
    return {name: build_intervention(name, s) for name, s in load_calibration(model_dir).items()}
