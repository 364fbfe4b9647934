"""taskmllm.eval.calibrate: the grid search against a stub evaluation with a known optimum (the objective and the
recall constraint computed by hand), the grids, and interventions.json (round trip, merge, atomic, strict)."""

from __future__ import annotations

import json

import pytest

from taskmllm.errors import CheckpointError, ConfigError, StaleCalibrationWarning
from taskmllm.eval.calibrate import (FILENAME, Objective, build_intervention, grid_search, layer_set, load_calibration,
                                     load_interventions, save_calibration, var_grid, vhr_grid, zerotuning_grid)
from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from taskmllm.model.interventions.vhr import default_layers

# metrics of the stub validation suite per VHR alpha (None = the plain model)
TABLE = {None: dict(pope_accuracy=0.80, chair_s=0.10, recall=0.90),
         1.25: dict(pope_accuracy=0.82, chair_s=0.09, recall=0.89),   # score 0.73, recall -0.01: feasible
         1.5: dict(pope_accuracy=0.84, chair_s=0.08, recall=0.885),   # score 0.76, recall -0.015: feasible, best
         2.0: dict(pope_accuracy=0.90, chair_s=0.05, recall=0.80)}    # score 0.85 but recall -0.10: infeasible


def stub(intervention):
    return TABLE[None if intervention is None else intervention.alpha]


def test_grid_search_picks_the_best_feasible_candidate():
    candidates = [{"alpha": a, "layers": [1, 2]} for a in (1.25, 1.5, 2.0)]
    seen = []
    res = grid_search("vhr", candidates, stub, progress=lambda i, n, row: seen.append((i, n)))
    want = {a: TABLE[a]["pope_accuracy"] - TABLE[a]["chair_s"] for a in (1.25, 1.5, 2.0)}
    assert res.baseline_score == pytest.approx(0.70)
    assert [row["score"] for row in res.table] == pytest.approx([want[1.25], want[1.5], want[2.0]])
    assert [row["feasible"] for row in res.table] == [True, True, False]
    assert res.best == VHR(alpha=1.5, layers=[1, 2]).settings() and res.best_score == pytest.approx(want[1.5])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    # a looser recall constraint admits alpha = 2 (the highest score)
    loose = grid_search("vhr", candidates, stub, Objective(max_recall_drop=0.2))
    assert loose.best["alpha"] == 2.0
    # a gain below min_gain is noise: alpha = 1.25 (+0.03) alone is kept only when min_gain <= 0.03
    assert grid_search("vhr", candidates[:1], stub, Objective(min_gain=0.05)).best is None
    assert grid_search("vhr", candidates[:1], stub, Objective(min_gain=0.02)).best["alpha"] == 1.25
    # nothing beats the plain model -> best is None
    only_bad = grid_search("vhr", [{"alpha": 2.0}], stub)
    assert only_bad.best is None and only_bad.best_score == only_bad.baseline_score
    assert only_bad.chosen() == VHR(alpha=1.0).settings(), "nothing helps: store the identity"
    assert res.chosen() == res.best
    record = res.record()
    assert record["objective"] == {"chair_weight": 1.0, "max_recall_drop": 0.02, "min_gain": 0.01,
                                   "accuracy_key": "pope_accuracy", "penalty_key": "chair_s", "recall_key": "recall"}


def test_grid_search_checks_inputs_before_running():
    calls = []
    with pytest.raises(ConfigError, match="alpha"):
        grid_search("vhr", [{"alpha": 1.5}, {"alpha": "2"}], lambda iv: calls.append(iv) or TABLE[None])
    assert calls == [], "a bad candidate is rejected before any evaluation"
    with pytest.raises(ConfigError, match="unknown intervention"):
        grid_search("vcd", [{}], stub)
    with pytest.raises(ConfigError, match="'recall'"):
        grid_search("vhr", [{"alpha": 1.5}], lambda iv: {"pope_accuracy": 0.5, "chair_s": 0.1})
    with pytest.raises(ConfigError, match="chair_weight"):
        Objective(chair_weight=-1)


def test_grids_scale_with_depth():
    assert layer_set("paper", 32) == default_layers(32), "'paper' is VHR's default rule"
    assert layer_set("late-half", 4) == [2, 3] and layer_set("late-quarter", 4) == [3]
    assert layer_set("late-quarter", 30) == list(range(22, 30))
    grid = vhr_grid(4, alphas=(1.5, 2.0), layer_sets=("paper", "middle-on", "late-half"))
    assert [(g["alpha"], g["layers"]) for g in grid] == [(1.5, [1, 2, 3]), (2.0, [1, 2, 3]), (1.5, [2, 3]),
                                                         (2.0, [2, 3])], "'middle-on' = 'paper' on 4 layers"
    assert len(var_grid()) == 9 and all(VAR.from_settings(s).mode == "official" for s in var_grid())
    zt = zerotuning_grid({"up": [(0, 1)], "down": [(2, 3)], "all": []}, gammas=(0.5, 1.0, 2.0))
    assert [(g["gamma"], g["heads"]) for g in zt] == [(2.0, [[0, 1]]), (0.5, [[2, 3]])]


def test_entries_record_their_weights_and_other_weights_drop_them(tmp_path):
    mine, other = {"model.safetensors": "a" * 64}, {"model.safetensors": "b" * 64}
    save_calibration(tmp_path, {"vhr": {"alpha": 1.5}}, weights=mine)
    save_calibration(tmp_path, {"var": {"p": 0.2}})  # no weights recorded: kept under any
    assert load_calibration(tmp_path, raw=True)["vhr"]["weights"] == mine
    assert sorted(load_calibration(tmp_path, weights=mine)) == ["var", "vhr"]
    with pytest.warns(StaleCalibrationWarning, match="'vhr' settings.*model.safetensors changed"):
        assert sorted(load_calibration(tmp_path, weights=other)) == ["var"]
    with pytest.warns(StaleCalibrationWarning, match=r"adapter.safetensors, model.safetensors changed"):
        assert sorted(load_calibration(tmp_path, weights={"adapter.safetensors": "a" * 64})) == ["var"]


def test_interventions_json_round_trip_merge_and_atomic(tmp_path):
    assert load_calibration(tmp_path) == {} and load_interventions(tmp_path) == {}
    vhr = {"alpha": 1.5, "layers": [2, 3], "remove_outliers": True}
    save_calibration(tmp_path, {"vhr": vhr}, records={"vhr": {"score": 0.76}})
    save_calibration(tmp_path, {"zerotuning": ZeroTuning(gammas={(0, 1): 0.5}).settings()})
    loaded = load_calibration(tmp_path)
    assert loaded["vhr"] == VHR(**vhr).settings(), "merged, not overwritten"
    assert loaded["zerotuning"] == {"gamma": 1.0, "heads": None, "gammas": [[0, 1, 0.5]]}
    assert load_calibration(tmp_path, raw=True)["vhr"]["calibration"] == {"score": 0.76}
    built = load_interventions(tmp_path)
    assert isinstance(built["vhr"], VHR) and built["vhr"].alpha == 1.5
    assert repr(built["zerotuning"]) == repr(ZeroTuning(gammas={(0, 1): 0.5}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME], "no temporary file left behind"
    with pytest.raises(ConfigError, match="alpha"):
        save_calibration(tmp_path, {"vhr": {"alpha": float("nan")}})
    assert load_calibration(tmp_path)["vhr"] == VHR(**vhr).settings(), "a rejected save leaves the file intact"
    with pytest.raises(CheckpointError, match="not a model directory"):
        save_calibration(tmp_path / "missing", {"vhr": vhr})


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot read"),
    (json.dumps([1, 2]), "not a taskmllm-interventions file"),
    (json.dumps({"format": "taskmllm-interventions", "version": 2, "interventions": {}}), "version 2"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1, "interventions": []}), "must be an object"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1,
                 "interventions": {"vcd": {"settings": {}}}}), "unknown intervention 'vcd'"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1,
                 "interventions": {"vhr": {"settings": {"alpha": "2"}}}}), "alpha"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1,
                 "interventions": {"var": {"settings": {"p": 0.4, "beta": 1}}}}), "unknown VAR settings"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1,
                 "interventions": {"var": {"settings": {}, "notes": 1}}}), "unknown keys"),
    (json.dumps({"format": "taskmllm-interventions", "version": 1,
                 "interventions": {"var": {"settings": {}, "weights": ["model.safetensors"]}}}), "'weights' must"),
])
def test_strict_loading(tmp_path, content, match):
    (tmp_path / FILENAME).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_calibration(tmp_path)


def test_build_intervention_types():
    assert isinstance(build_intervention("var", {"mode": "paper"}), VAR)
    assert isinstance(build_intervention("zerotuning", {"gamma": 2.0}), ZeroTuning)
