"""Shared fixtures: a tiny tokenizer and tiny TaskMLLMs that build on CPU in about a second."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = [
    "USER: Is there a red circle in the image? ASSISTANT: Yes, there is a red circle.",
    "USER: What color is the square? ASSISTANT: The square is blue.",
    "USER: How many triangles are there? ASSISTANT: There are 3 triangles.",
    "USER: Segment the green star. ASSISTANT: Sure, <ref>the green star</ref><seg>.",
    "USER: Find all hexagons. ASSISTANT: <ref>hexagons</ref><det> <box>12,345,999,0</box>",
    "USER: Track the yellow heart. ASSISTANT: <ref>the yellow heart</ref><track>.",
    "A small purple circle left of a large orange square.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from taskmllm.model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, vocab_size=400, tasks=("seg", "det", "track"))


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, **vision):
    from taskmllm.model.config import MLLMConfig, TokenConfig, VisionConfig

    llm = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    v = dict(image_size=48, patch_size=16, width=32, layers=2, heads=2) | vision
    return MLLMConfig(vision=VisionConfig(**v), llm=llm, tokens=TokenConfig(tasks={"seg": 1, "det": 4, "track": 1}))


@pytest.fixture()
def tiny_model(tokenizer):
    from taskmllm.model.mllm import TaskMLLM

    torch.manual_seed(0)
    return TaskMLLM(tiny_config(tokenizer), tokenizer).eval()


@pytest.fixture()
def rgb_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def overfit(tokenizer):
    """(model, prompts, images, answers) after 60 AdamW steps on one batch; ``model.losses`` holds the curve."""
    from taskmllm.model.mllm import TaskMLLM


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


@pytest.fixture(scope="session")
def tiny_joint(tokenizer):
    """A random tiny JointModel (the tiny TaskMLLM above + fresh experts), eval mode."""
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.router.joint import JointModel

    torch.manual_seed(0)
    return JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_joint, tmp_path_factory):
    """:func:`tiny_joint` saved as a checkpoint directory (do not modify it: copy it first)."""
    return tiny_joint.save_pretrained(tmp_path_factory.mktemp("tiny-joint") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_joint):
    from taskmllm.router.pipeline import Pipeline

    return Pipeline(tiny_joint)
