"""Report writer: valid JSON, markdown tables, non-blank PNGs, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from taskmllm.errors import MetricInputError
from taskmllm.eval.aggregate import aggregate_seeds
from taskmllm.eval.detection import DetectionGroundTruth, DetectionPrediction, coco_ap
from taskmllm.eval.grounding import referring_segmentation
from taskmllm.eval.hallucination import pope_summary
from taskmllm.eval.report import PlotSpec, render_markdown, write_report
from taskmllm.eval.routing import routing_accuracy
from taskmllm.eval.tracking import tracking_metrics


def _tracking(shift: float) -> dict[str, Any]:
    t = np.arange(30, dtype=float)
    gt = np.stack([t, t, t + 20, t + 20], axis=1)
    pred = gt + np.array([shift, 0, shift, 0]) * (t[:, None] / 10)
    return tracking_metrics([pred], [gt])


def _detection(shift: float) -> dict[str, Any]:
    gts = [DetectionGroundTruth(boxes=[[10, 10, 50, 50], [60, 60, 90, 100]], labels=[1, 2], height=120, width=120)]
    preds = [DetectionPrediction(boxes=np.asarray(gts[0].boxes, float) + shift, scores=[0.9, 0.6], labels=[1, 2])]
    return coco_ap(gts, preds)


def _pope(n_yes: int) -> dict[str, Any]:
    labels = ["yes"] * 4 + ["no"] * 4
    answers = {s: ["Yes"] * (n_yes + k) + ["No"] * (8 - n_yes - k) for k, s in enumerate(("random", "popular"))}
    return pope_summary({s: (a, labels) for s, a in answers.items()})


def _results() -> dict[str, Any]:
    comparison = aggregate_seeds({
        run: [{"chair_s": base + d, "chair_i": base / 3 + d, "pope_f1": 0.8 - d} for d in (0.0, 0.02, 0.05)]
        for run, base in (("none", 0.5), ("VAR", 0.45), ("VHR", 0.33))
    })
    return {
        "model": "tiny", "seed": np.int64(0), "undefined": float("nan"),
        "refseg": referring_segmentation([np.ones((2, 2))], [np.eye(2)]),
        "pope": {"none": _pope(6), "VHR": _pope(4)},
        "routing": routing_accuracy([["<seg>"], ["<det>"]], [["<seg>"], ["<seg>"]]),
        "tracking": _tracking(3.0),
        "detection": _detection(4.0),
        "comparison": comparison,
    }


def _plots(results: dict[str, Any]) -> list[PlotSpec]:
    return [
        PlotSpec("tracking_success", {"none": _tracking(3.0), "VHR": _tracking(1.0)}),
        PlotSpec("tracking_precision", {"none": _tracking(3.0), "VHR": _tracking(1.0)}),
        PlotSpec("detection_pr", {"model": results["detection"]}),
        PlotSpec("pope_yes_ratio", results["pope"]),
        PlotSpec("run_comparison", results["comparison"], filename="chair_comparison.png",
                 options={"metrics": ["chair_s", "chair_i"], "ylabel": "Rate (lower is better)"}),
    ]


def _strict_json(text: str) -> Any:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=reject)


def test_write_report_produces_json_markdown_and_pngs(tmp_path: Path) -> None:
    results = _results()
    report = write_report(results, tmp_path / "out", plots=_plots(results))

    data = _strict_json(report.json_path.read_text())
    assert data["seed"] == 0 and data["undefined"] is None
    assert data["refseg"]["giou"] == pytest.approx(0.5)
    assert len(data["tracking"]["success_curve"]["values"]) == 21

    md = report.markdown_path.read_text()
    assert md.startswith("# Evaluation results")
    assert "## refseg" in md and "| metric | value |" in md and "| ciou | 0.5000 |" in md
    assert "### pope / none / splits" in md
    assert "| splits | accuracy | precision | recall | f1 | yes_ratio |" in md
    assert "| &lt;seg&gt; |" in md  # routing per-task table; task tokens escaped so they do not vanish as HTML
    assert "| pope | mean_f1 | mean_accuracy | mean_yes_ratio |" in md  # runs side by side
    assert "| comparison | chair_s | chair_i | pope_f1 |" in md
    assert " ± " in md and "(n=3)" in md

    names = sorted(p.name for p in report.plot_paths)
    assert names == ["chair_comparison.png", "detection_pr.png", "pope_yes_ratio.png", "tracking_precision.png",
                     "tracking_success.png"]
    for path in report.plot_paths:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 400
        assert pixels.std() > 10  # not blank
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, text and colours were drawn
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave no temporary files
    for path in [report.json_path, report.markdown_path, *report.plot_paths]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # readable by others, like any report


def test_rewriting_replaces_files(tmp_path: Path) -> None:
    write_report({"a": {"x": 1.0}}, tmp_path)
    write_report({"a": {"x": 2.0}}, tmp_path)
    assert _strict_json((tmp_path / "results.json").read_text()) == {"a": {"x": 2.0}}


def test_markdown_separates_suites_of_different_shape() -> None:
    md = render_markdown({"refseg": {"ciou": 0.5, "giou": 0.25}, "rec": {"acc@0.5": 0.75}})
    assert "## refseg" in md and "## rec" in md
    assert "| acc@0.5 | 0.7500 |" in md


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(MetricInputError, match="unknown plot kind"):
        write_report({}, tmp_path, plots=[PlotSpec("pie", {"a": {}})])  # type: ignore[arg-type]
    with pytest.raises(MetricInputError, match="distinct"):
        write_report({}, tmp_path, plots=[PlotSpec("detection_pr", {}), PlotSpec("detection_pr", {})])
    with pytest.raises(MetricInputError, match="plain name"):
        write_report({}, tmp_path, plots=[PlotSpec("detection_pr", {}, filename="../x.png")])
    with pytest.raises(MetricInputError, match="cannot be written to JSON"):
        write_report({"bad": object()}, tmp_path)
    with pytest.raises(MetricInputError, match="pope_summary"):
        write_report({}, tmp_path, plots=[PlotSpec("pope_yes_ratio", {"run": {"f1": 1.0}})])
    # the JSON and markdown were written before the plot failed
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
