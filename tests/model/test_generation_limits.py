"""Generation never runs past the language model's context; options are checked at ``TaskMLLM.generate`` too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.generation import _advance
from tests.conftest import tiny_config

CONTEXT = 64


@pytest.fixture(scope="module")
def short_model(tokenizer):
    """A tiny model whose LLM holds 64 positions (the prompt below takes about 40)."""
    from taskmllm.model.mllm import TaskMLLM

    cfg = tiny_config(tokenizer)
    cfg.llm["max_position_embeddings"] = CONTEXT
    torch.manual_seed(0)
    return TaskMLLM(cfg, tokenizer).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_stops_at_the_context(short_model, use_cache):
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    batch = short_model.processor(["Describe it.", "What is this image about, in detail?"], [image, None])
    prompt_lengths = batch.attention_mask.sum(1).tolist()
    out = short_model.generate(batch, max_new_tokens=500, do_sample=True, temperature=50.0, use_cache=use_cache,
                               generator=torch.Generator().manual_seed(0))
    eos = short_model.tokenizer.eos_token_id
    for length, seq in zip(prompt_lengths, out.sequences):
        fed = len(seq) - 1  # every id but the last was fed back (the last is EOS or one the context has no room for)
        assert length + fed <= CONTEXT
        assert seq[-1] == eos or length + fed == CONTEXT  # it stopped at EOS or at a full context, not before


def test_a_task_token_whose_queries_do_not_fit_is_not_emitted(short_model):
    det = short_model.tokenizer.convert_tokens_to_ids("<det>")  # 4 queries: needs 5 positions
    eos = short_model.tokenizer.eos_token_id
    seqs, counts, done = [[]], [0], [False]
    assert _advance(short_model, 0, det, seqs, counts, done, eos, max_new=100, room=4) == []
    assert seqs == [[]] and done == [True]
    seqs, counts, done = [[]], [0], [False]
    fed = _advance(short_model, 0, det, seqs, counts, done, eos, max_new=100, room=5)
    assert len(fed) == 5 and seqs[0] == [det] + [short_model.query_id] * 4 and done == [False]
    seqs, counts, done = [[]], [0], [False]
    word = short_model.tokenizer.convert_tokens_to_ids("red")
    assert _advance(short_model, 0, word, seqs, counts, done, eos, max_new=100, room=0) == []
    assert seqs == [[word]] and done == [True]  # a plain token is kept: it was predicted inside the context


def test_generate_checks_its_options(short_model):
    batch = short_model.processor("Describe it.")
    with pytest.raises(ConfigError, match=r"unknown generation option 'temprature' \(did you mean 'temperature'\?\)"):
        short_model.generate(batch, temprature=0.5)
    with pytest.raises(ConfigError, match="top_p must be a finite number in"):
        short_model.generate(batch, do_sample=True, top_p=float("inf"))
    with pytest.raises(ConfigError, match="use_cache must be True or False"):
        short_model.generate(batch, use_cache=None)


def test_tiny_temperatures_sample_the_argmax_without_nan(short_model):
    batch = short_model.processor("Describe it.")
    greedy = short_model.generate(batch, max_new_tokens=5).sequences
    cold = short_model.generate(batch, max_new_tokens=5, do_sample=True, temperature=1e-300,
                                generator=torch.Generator().manual_seed(0)).sequences
    assert cold == greedy
