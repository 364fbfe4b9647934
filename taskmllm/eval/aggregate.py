"""Aggregate per-seed metric results of several runs into mean ± std (for tables and bar charts)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from taskmllm.errors import MetricInputError

__all__ = ["aggregate_seeds"]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def aggregate_seeds(per_seed: Mapping[str, Sequence[Mapping[str, object]]],
                    metrics: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over seeds of each numeric metric of each run.

    Args:
        per_seed: run label -> one flat metric dict per seed, e.g.
            ``{"none": [{"chair_s": .41, ...}, {"chair_s": .43, ...}], "VHR": [...]}``.
        metrics: metric keys to aggregate (default: every key holding a finite number in the first seed).

    Returns:
        ``{run: {metric: {"mean": float, "std": float, "n": int}}}``. ``std`` is the sample standard
        deviation (``ddof=1``) over seeds, 0.0 for a single seed. Non-finite values are ignored.

    Raises:
        MetricInputError: a run has no seeds, or a requested metric is missing or not numeric.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run, seeds in per_seed.items():
        if not seeds:
            raise MetricInputError(f"run {run!r} has no seed results")
        keys = list(metrics) if metrics is not None else [
            k for k, v in seeds[0].items()
            if _is_number(v) and math.isfinite(float(v))
        ]
        out[run] = {}
        for key in keys:
            values: list[float] = []
            for i, seed in enumerate(seeds):
                value = seed.get(key)
                if not _is_number(value):
                    raise MetricInputError(f"run {run!r}, seed {i}: metric {key!r} is missing or not a number")
                if math.isfinite(float(value)):
                    values.append(float(value))
            arr = np.asarray(values, dtype=np.float64)
            out[run][key] = {
                "mean": float(arr.mean()) if arr.size else float("nan"),
                "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                "n": int(arr.size),
            }
    return out
