"""Shared settings for training tests: stage YAMLs with tiny-model overrides."""

from __future__ import annotations

from pathlib import Path

import taskmllm

RECIPE = Path(taskmllm.__file__).parent / "training" / "recipes" / "tiny"
STAGES = ("pretrain", "assign", "heads", "joint")

#: a model and data small enough for a few CPU steps per second
TINY = ["--model.init=tiny", "--model.llm.hidden_size=64", "--model.llm.intermediate_size=128",
        "--model.llm.num_hidden_layers=1", "--model.vision.kind=open_clip", "--model.vision.width=32",
        "--model.vision.layers=1", "--model.vision.heads=2", "--model.vision.image_size=48", "--model.max_frames=2",
        "--data.sources.shapes.image_size=48", "--data.sources.shapes.num_frames=2", "--data.batch_size=2",
        "--progress=false", "--optim.warmup_steps=1", "--model.vision.pretrained=",  # a tiny random ViT
        "--data.workers=0"]  # loading in the test process (tests/training/test_data_loader.py runs workers)


def overrides(tmp_path, *extra: str) -> list[str]:
    return TINY + [f"--out_dir={tmp_path}"] + list(extra)
