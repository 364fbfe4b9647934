"""PNG plots of evaluation results, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Each function takes ``runs``: a mapping from a run label (``"none"``, ``"VAR"``, ``"VHR"``, a checkpoint
name…) to the dict one metric function returned, writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from taskmllm.errors import MetricInputError

__all__ = ["plot_detection_pr", "plot_pope_yes_ratio", "plot_run_comparison", "plot_tracking_precision",
           "plot_tracking_success"]

_DPI = 120


def _new_figure(width: float = 6.4, height: float = 4.8) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG to a temporary file beside ``path`` and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; reports are meant to be shared
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _require_runs(runs: Mapping[str, Any], what: str) -> None:
    if not runs:
        raise MetricInputError(f"{what} plot needs at least one run")


def _curve(result: Mapping[str, Any], key: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        curve = result[key]
        xs = np.asarray(curve["thresholds" if "thresholds" in curve else "recall"], dtype=float)
        ys = np.asarray(curve["values" if "values" in curve else "precision"], dtype=float)
    except (KeyError, TypeError) as exc:
        raise MetricInputError(f"run {label!r} has no usable {key!r} curve: {exc}") from exc
    if xs.shape != ys.shape or xs.ndim != 1:
        raise MetricInputError(f"run {label!r}: {key!r} x and y lengths differ")
    return xs, ys


def _plot_curves(runs: Mapping[str, Mapping[str, Any]], what: str, key: str,
                 legend: Callable[[str, Mapping[str, Any], np.ndarray, np.ndarray], str], legend_loc: str,
                 **axes: Any) -> tuple[Figure, Axes]:
    """One line per run of its ``key`` curve, labelled ``legend(label, result, xs, ys)``; ``axes``: ``ax.set``."""
    _require_runs(runs, what)
    fig, ax = _new_figure()
    for label, result in runs.items():
        xs, ys = _curve(result, key, label)
        ax.plot(xs, ys, linewidth=2, label=legend(label, result, xs, ys))
    ax.set(**axes)
    ax.grid(True, alpha=0.3)
    ax.legend(loc=legend_loc)
    return fig, ax


def plot_tracking_success(runs: Mapping[str, Mapping[str, Any]], path: Path,
                          title: str = "Success plot (one-pass evaluation)") -> Path:
    """Success rate vs IoU threshold per run (from :func:`~taskmllm.eval.tracking.tracking_metrics`); AUC in legend."""
    fig, _ = _plot_curves(runs, "tracking success", "success_curve",
                          lambda label, r, xs, ys: f"{label} [AUC {r.get('success_auc', float(ys.mean())):.3f}]",
                          "lower left", title=title, xlabel="Overlap (IoU) threshold", ylabel="Success rate",
                          xlim=(0, 1), ylim=(0, 1.02))
    return _save(fig, path)


def plot_tracking_precision(runs: Mapping[str, Mapping[str, Any]], path: Path,
                            title: str = "Precision plot (one-pass evaluation)") -> Path:
    """Precision vs center-location-error threshold (px) per run; precision@20 px in the legend."""
    def legend(label: str, r: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> str:
        return f"{label} [P@20px {r.get('precision@20', float(np.interp(20.0, xs, ys))):.3f}]"

    fig, ax = _plot_curves(runs, "tracking precision", "precision_curve", legend, "lower right", title=title,
                           xlabel="Center location error threshold (pixels)", ylabel="Precision", ylim=(0, 1.02))
    ax.axvline(20.0, color="gray", linestyle="--", linewidth=1, label="20 px")
    ax.set_xlim(left=0)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_detection_pr(runs: Mapping[str, Mapping[str, Any]], path: Path,
                      title: str = "Detection precision-recall (IoU 0.5)") -> Path:
    """Precision–recall curve at IoU 0.5 (COCOeval's precision array, mean over classes) per run."""
    def legend(label: str, r: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> str:
        ap50 = r.get("AP50")
        return f"{label} [AP50 {ap50:.3f}]" if isinstance(ap50, (int, float)) else label

    fig, _ = _plot_curves(runs, "detection precision-recall", "pr_curve", legend, "lower left", title=title,
                          xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02))
    return _save(fig, path)


def _bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]],
          errors: Mapping[str, Sequence[float]] | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar (and color) per series, value labels on top."""
    k = len(series)
    width = 0.8 / max(k, 1)
    x = np.arange(len(groups), dtype=float)
    for j, (name, values) in enumerate(series.items()):
        err = None if errors is None else errors[name]
        bars = ax.bar(x + (j - (k - 1) / 2) * width, values, width, yerr=err, capsize=4 if err is not None else 0,
                      label=name)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(x, list(groups))


def plot_pope_yes_ratio(runs: Mapping[str, Mapping[str, Any]], path: Path,
                        title: str = "POPE yes-ratio per split") -> Path:
    """Yes-ratio per POPE split, one bar per run (from :func:`~taskmllm.eval.hallucination.pope_summary`).

    A dashed line marks 0.5, the yes-ratio of an unbiased model on POPE's balanced splits.
    """
    _require_runs(runs, "POPE yes-ratio")
    splits: list[str] = []
    for label, result in runs.items():
        if not isinstance(result.get("splits"), Mapping):
            raise MetricInputError(f"run {label!r} is not a pope_summary result (no 'splits')")
        splits += [s for s in result["splits"] if s not in splits]
    series = {label: [float(result["splits"].get(s, {}).get("yes_ratio", np.nan)) for s in splits]
              for label, result in runs.items()}
    fig, ax = _new_figure(max(6.4, 1.6 * len(splits) * max(1, len(runs)) / 2 + 2))
    _bars(ax, splits, series)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="balanced (0.5)")
    ax.set(title=title, xlabel="POPE split", ylabel="Yes-ratio (fraction answered 'yes')", ylim=(0, 1.12))
    ax.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never hides bars
    return _save(fig, path)


def plot_run_comparison(comparison: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path,
                        metrics: Sequence[str] | None = None,
                        title: str = "Comparison of runs (mean ± std over seeds)", ylabel: str = "Value") -> Path:
    """Grouped bars: one group per metric, one bar per run, error bars = std over seeds.

    Args:
        comparison: run -> metric -> ``{"mean": float, "std": float, "n": int}`` as produced by
            :func:`taskmllm.eval.aggregate.aggregate_seeds`.
        metrics: which metrics to show, in order (default: all, in first-seen order). Put metrics on
            comparable scales in one plot (e.g. fractions), make a second plot for lengths.
    """
    _require_runs(comparison, "run comparison")
    if metrics is None:
        metrics = []
        for per_metric in comparison.values():
            metrics += [m for m in per_metric if m not in metrics]
    if not metrics:
        raise MetricInputError("run comparison plot has no metric to show")
    means: dict[str, list[float]] = {}
    stds: dict[str, list[float]] = {}
    for run, per_metric in comparison.items():
        try:
            means[run] = [float(per_metric[m]["mean"]) if m in per_metric else np.nan for m in metrics]
            stds[run] = [float(per_metric[m].get("std", 0.0)) if m in per_metric else 0.0 for m in metrics]
        except (KeyError, TypeError, AttributeError) as exc:
            raise MetricInputError(f"run {run!r}: each metric must be a {{'mean', 'std'}} dict ({exc})") from exc
    fig, ax = _new_figure(max(6.4, 1.2 * len(metrics) * max(1, len(comparison)) / 2 + 2))
    _bars(ax, metrics, means, stds)
    top = np.nanmax([m + s for run in means for m, s in zip(means[run], stds[run])] + [0.0])
    ax.set(title=title, xlabel="Metric", ylabel=ylabel, ylim=(0, top * 1.18 if top > 0 else 1.0))
    ax.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
