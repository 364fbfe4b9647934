"""The smol stage YAMLs load strictly and name the right components (no packages needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

import taskmllm
from taskmllm.training.config import check_paths, load_config

RECIPE = Path(taskmllm.__file__).parent / "training" / "recipes" / "smol"


@pytest.mark.parametrize("stage,trainable", [
    ("align", {"projector": "full"}),
    ("see", {"projector": "frozen", "llm": "lora"}),
    ("heads", {"experts": "full", "queries": "full"}),
    ("joint", {"projector": "frozen", "llm": "lora", "queries": "full", "experts": "full"}),
    ("experts", {"experts": "full"}),
])
def test_stage_yamls_load(stage, trainable):
    cfg = load_config(RECIPE / f"{stage}.yaml")
    assert cfg.stage.name == stage and cfg.stage.trainable == trainable
    shapes = cfg.data.specs()["shapes"]
    assert shapes.image_size == 192 and cfg.model.max_frames == shapes.num_frames == 4
    assert cfg.out_dir == f"runs/smol/{stage}"


def test_align_starts_from_the_recipe_and_deepspeed_config_resolves_beside_it():
    cfg = load_config(RECIPE / "align.yaml", ["--deepspeed=ds_zero2.json"])
    assert cfg.model.init == "smol"
    assert cfg.model.image_first  # LLaVA's layout; later stages keep the checkpoint's
    assert shapes_layouts() == {None}  # every stage's questions follow the model's layout
    assert Path(cfg.deepspeed) == RECIPE / "ds_zero2.json"
    check_paths(cfg)  # 'smol' is a recipe name, not a directory


def test_align_is_a_words_warm_up_that_never_runs_the_llm():
    """align trains the projector on the words regression alone (no LM loss, no expert): a stage whose losses
    read only the LLM's inputs, so the trainer stops at the input embeddings; see then keeps those tokens."""
    cfg = load_config(RECIPE / "align.yaml")
    assert cfg.stage.lm_weight == 0 and not any(cfg.stage.expert_weights.values())
    assert set(cfg.stage.aux) == {"words"} and cfg.stage.aux["words"]["regress"] > 0
    assert load_config(RECIPE / "see.yaml").stage.trainable["projector"] == "frozen"


def shapes_layouts() -> set:
    return {load_config(RECIPE / f"{s}.yaml").data.specs()["shapes"].question_first
            for s in ("align", "see", "heads", "joint", "experts")}


def test_later_stages_need_the_previous_final_directory():
    from taskmllm.errors import ConfigError

    with pytest.raises(ConfigError, match="neither a recipe"):
        check_paths(load_config(RECIPE / "heads.yaml", ["--model.init=/nonexistent/final"]))


@pytest.mark.parametrize("stage", ["see", "joint"])
def test_stages_that_tune_the_llm_replay_its_own_text_answers(stage):
    """see and joint mix SmolLM2's own answers (``replay.json`` beside the YAMLs, text-only LLaVA entries) into
    their batches, so LoRA keeps its language."""
    from taskmllm.data.formats import load_llava

    cfg = load_config(RECIPE / f"{stage}.yaml")
    text = cfg.data.specs()["text"]
    assert text.kind == "llava" and Path(text.path) == RECIPE / "replay.json" and 0 < text.weight < 1
    samples = load_llava(text.path).samples
    assert len(samples) >= 100 and all(s.image_path is None for s in samples)
