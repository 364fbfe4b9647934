"""A tiny model overfit on two answers with task tokens (shared by the training and generation tests)."""

from __future__ import annotations

import pytest
import torch

from taskmllm.model.mllm import TaskMLLM
from tests.conftest import tiny_config


@pytest.fixture(scope="package")
def overfit(tokenizer):
    """(model, prompts, images, answers, losses) after 60 AdamW steps on one batch."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), None]
    prompts = ["Segment the green star.", "Find all hexagons."]
    answers = ["Sure, <ref>the green star</ref><seg>.", "<ref>hexagons</ref><det> <box>12,345,999,0</box>"]
    torch.manual_seed(0)
    model = TaskMLLM(tiny_config(tokenizer), tokenizer)
    batch = model.processor(prompts, images, answers=answers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    model.losses = losses
    return model, prompts, images, answers
