"""The tiny recipe: the shipped tokenizer and a model built from it."""

from __future__ import annotations

import itertools

import pytest
import torch

from taskmllm.model.tokens import PROTOCOL_TOKENS
from taskmllm.zoo import load_tiny_tokenizer, tiny_config


def test_shipped_tokenizer_has_protocol_tokens_and_whole_words():
    from taskmllm.data.shapesworld.conversations import corpus

    tok = load_tiny_tokenizer()
    for t in PROTOCOL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    words = {w.strip(".,?!") for text in itertools.islice(corpus(400, seed=123), 400) for w in text.split()}
    words = {w for w in words if w.isalpha()}
    split = [w for w in words if min(len(tok.encode(v, add_special_tokens=False)) for v in (w, " " + w)) > 1]
    assert len(split) <= 0.05 * len(words), split  # the ShapesWorld vocabulary is (almost) all single tokens


def test_tiny_recipe_model_forward(tmp_path):
    from taskmllm.model.mllm import TaskMLLM

    tok = load_tiny_tokenizer()
    cfg = tiny_config(tok)
    assert cfg.llm["vocab_size"] == len(tok)
    torch.manual_seed(0)
    model = TaskMLLM(cfg, tok)
    batch = model.processor(["Segment the red circle."], [torch.rand(100, 80, 3).numpy()],
                            answers=["Sure, <ref>the red circle</ref><seg>."])
    assert model(batch).loss.item() > 0
    assert (batch.input_ids == model.image_id).sum() == 36


def test_the_tiny_builder_is_the_shipped_tiny():
    """``zoo.tiny_config`` (what ``model.init: tiny`` builds) is the shipped ``tiny``'s config, and a fresh
    ``build_tiny()`` takes the shipped weights strictly (every tensor, same shapes): one is derived from the other."""
    from safetensors.torch import load_model

    from taskmllm.model.config import MLLMConfig
    from taskmllm.zoo import SHIPPED, build_tiny

    shipped = MLLMConfig.load(SHIPPED["tiny"] / "config.json")
    assert tiny_config(load_tiny_tokenizer()) == shipped
    model = build_tiny()
    assert model.config == shipped
    missing, unexpected = load_model(model, str(SHIPPED["tiny"] / "model.safetensors"), strict=True)
    assert not missing and not unexpected


@pytest.mark.slow
def test_tokenizer_rebuild_is_deterministic(tmp_path):
    from taskmllm.zoo import TINY_TOKENIZER, build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (TINY_TOKENIZER / "tokenizer.json").read_text()
