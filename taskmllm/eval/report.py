"""Write evaluation results: ``results.json``, ``results.md`` (markdown tables) and PNG plots.

``results`` is a nested dict as the metric functions return them, grouped by the caller, e.g.::

    {"model": "tiny", "seed": 0,
     "refseg": referring_segmentation(...),
     "pope": {"none": pope_summary(...), "VHR": pope_summary(...)},
     "comparison": aggregate_seeds({...})}

JSON: numpy scalars and arrays become plain numbers and lists, NaN/inf become ``null`` (strict JSON).
Markdown: one section per dict that holds numbers; its scalar entries become a two-column
``metric | value`` table — except for two or more sibling dicts whose numbers have the same keys
(POPE splits, per-task routing, runs of a comparison): they share one table with a row per sibling. ``{"mean", "std", "n"}`` dicts print
as ``mean ± std (n=…)``. Lists (curves, per-sample details) stay in the JSON only.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from taskmllm.errors import MetricInputError
from taskmllm.eval import plots as _plots

__all__ = ["PlotSpec", "Report", "render_markdown", "to_jsonable", "write_report"]

PlotKind = Literal["tracking_success", "tracking_precision", "detection_pr", "pope_yes_ratio", "run_comparison"]

_PLOTTERS: Mapping[str, Callable[..., Path]] = MappingProxyType({
    "tracking_success": _plots.plot_tracking_success,
    "tracking_precision": _plots.plot_tracking_precision,
    "detection_pr": _plots.plot_detection_pr,
    "pope_yes_ratio": _plots.plot_pope_yes_ratio,
    "run_comparison": _plots.plot_run_comparison,
})
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$")


@dataclass(frozen=True)
class PlotSpec:
    """One plot to draw.

    Attributes:
        kind: ``"tracking_success"`` / ``"tracking_precision"`` (data: run -> ``tracking_metrics`` result),
            ``"detection_pr"`` (run -> ``coco_ap`` result), ``"pope_yes_ratio"`` (run -> ``pope_summary``
            result), ``"run_comparison"`` (run -> metric -> ``{"mean", "std"}``, see ``aggregate_seeds``).
        data: the mapping described for ``kind``; one run is ``{"model": result}``.
        filename: PNG file name inside the output directory (default ``f"{kind}.png"``).
        title: plot title (default: one naming the plot kind).
        options: extra keyword arguments for the plot function (``metrics=``, ``ylabel=`` for comparisons).
    """

    kind: PlotKind
    data: Mapping[str, Any]
    filename: str | None = None
    title: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """Paths of what :func:`write_report` wrote."""

    json_path: Path
    markdown_path: Path
    plot_paths: tuple[Path, ...]


def to_jsonable(obj: Any, where: str = "results") -> Any:
    """Plain-JSON copy of ``obj``: numpy → Python, tuples/sets → lists, Paths → str, NaN/inf → None.

    Raises:
        MetricInputError: a value of a type JSON cannot hold (the message names where it is).
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Path):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{where}.{f.name}") for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v, where) for v in obj), key=repr)
    raise MetricInputError(f"{where}: a {type(obj).__name__} cannot be written to JSON")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, fsync it, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; reports are meant to be shared
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------- markdown


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Real))


def _is_mean_std(value: Any) -> bool:
    return isinstance(value, Mapping) and "mean" in value and "std" in value and set(value) <= {"mean", "std", "n"}


def _is_cell(value: Any) -> bool:
    return _is_scalar(value) or _is_mean_std(value)


def _fmt_number(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def _cell(value: Any) -> str:
    if _is_mean_std(value):
        n = f" (n={int(value['n'])})" if "n" in value else ""
        return f"{_fmt_number(float(value['mean']))} ± {_fmt_number(float(value['std']))}{n}"
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return _fmt_number(float(value))
    return _text(value)


def _text(value: object) -> str:
    """Markdown-safe text: ``<seg>`` would otherwise vanish as an HTML tag, ``|`` would split a cell."""
    return (str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_text(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _cells(node: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if _is_cell(v)}


def _render(node: Mapping[str, Any], path: list[str], out: list[str], level: int = 1,
            skip_cells: bool = False) -> None:
    scalars = {} if skip_cells else _cells(node)
    children = {k: v for k, v in node.items() if isinstance(v, Mapping) and not _is_mean_std(v)}
    # Siblings of the same shape (POPE splits, runs, tasks) share one table with a row per sibling.
    shapes = {frozenset(_cells(v)) for v in children.values()}
    rows = children if len(children) >= 2 and len(shapes) == 1 and next(iter(shapes)) else {}
    if path and (scalars or rows):
        level += 1
        out += ["#" * min(level, 6) + " " + " / ".join(path), ""]
    if scalars:
        out += _table(["metric", "value"], [[_text(k), _cell(v)] for k, v in scalars.items()])
    if rows:
        columns = list(_cells(next(iter(rows.values()))))
        out += _table([path[-1] if path else "name"] + columns,
                      [[_text(name)] + [_cell(row[c]) for c in columns] for name, row in rows.items()])
    for key, child in children.items():
        _render(child, path + [str(key)], out, level, skip_cells=key in rows)


def render_markdown(results: Mapping[str, Any], title: str = "Evaluation results") -> str:
    """Markdown with one table per metric group of ``results`` (see module doc for the layout)."""
    out = [f"# {title}", ""]
    _render(to_jsonable(results), [], out)
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- write


def write_report(results: Mapping[str, Any], out_dir: Path, plots: Sequence[PlotSpec] = (),
                 title: str = "Evaluation results") -> Report:
    """Write ``results.json``, ``results.md`` and one PNG per :class:`PlotSpec` into ``out_dir``.

    Files are written atomically (temporary file + ``os.replace``) in that order, so a failing plot
    never leaves a half-written JSON or markdown file; existing files are replaced.

    Raises:
        MetricInputError: ``results`` is not a dict or holds a value JSON cannot hold, a plot spec has an
            unknown kind, a bad or duplicate file name, or data its plot cannot use.
    """
    if not isinstance(results, Mapping):
        raise MetricInputError(f"results must be a dict, got {type(results).__name__}")
    names: list[str] = []
    for spec in plots:
        if spec.kind not in _PLOTTERS:
            raise MetricInputError(f"unknown plot kind {spec.kind!r}; known: {sorted(_PLOTTERS)}")
        name = spec.filename or f"{spec.kind}.png"
        if not _FILENAME.match(name):
            raise MetricInputError(f"plot file name {name!r} must be a plain name ending in .png")
        if name in names:
            raise MetricInputError(f"two plots would be written to {name!r}; give them distinct filenames")
        names.append(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_jsonable(results)
    json_path = out_dir / "results.json"
    _atomic_write_text(json_path, json.dumps(plain, indent=2, allow_nan=False) + "\n")
    md_path = out_dir / "results.md"
    _atomic_write_text(md_path, render_markdown(plain, title))
    written: list[Path] = []
    for spec, name in zip(plots, names):
        kwargs = dict(spec.options)
        if spec.title is not None:
            kwargs["title"] = spec.title
        written.append(_PLOTTERS[spec.kind](spec.data, out_dir / name, **kwargs))
    return Report(json_path=json_path, markdown_path=md_path, plot_paths=tuple(written))
