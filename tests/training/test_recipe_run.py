"""The recipe runner's plan and the model card's headline numbers (no training: hand-built inputs)."""

import pytest

from taskmllm.errors import ConfigError
from taskmllm.training.card import headline
from taskmllm.training.recipe_run import load_plan


def test_tiny_plan_names_existing_stage_files():
    plan = load_plan("tiny")
    assert plan.stages == ["pretrain", "assign", "heads", "joint"]
    assert "shapes" in plan.eval_suites


def test_unknown_recipe_and_bad_plan_are_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="known recipes"):
        load_plan(str(tmp_path / "nope"))
    (tmp_path / "recipe.yaml").write_text("stages: [a]\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_plan(str(tmp_path))
    (tmp_path / "recipe.yaml").write_text("stages: [a]\n")
    with pytest.raises(ConfigError, match="missing"):
        load_plan(str(tmp_path))


def test_headline_weights_routing_by_questions_and_averages_vqa():
    summary = {"exist": {"n": 100, "routing": 1.0, "score": 0.9}, "color": {"n": 100, "routing": 1.0, "score": 0.6},
               "count": {"n": 100, "routing": 1.0, "score": 0.75}, "seg": {"n": 100, "routing": 0.5, "score": 0.4}}
    pope = {"pope": {"splits": {"random": {"f1": 0.8}}}}
    got = headline({"summary": summary}, pope)
    assert got["routing"] == pytest.approx(3.5 / 4)  # (1 + 1 + 1 + 0.5) / 4 questions-weighted
    assert got["vqa"] == pytest.approx((0.9 + 0.6 + 0.75) / 3)
    assert got["seg"] == 0.4 and got["pope_f1"] == 0.8 and got["det"] is None
