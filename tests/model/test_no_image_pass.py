"""VHR's no-image pass inputs: hand-built layouts, the packed mask, and the packed forward against transformers'
own decoder computing the whole text and the prompt alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, MistralConfig, StaticCache

from taskmllm.errors import InputError
from taskmllm.model.decoding import attention_bias
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.no_image_pass import (full_attention_for, is_empty_cache, keep_prompt_columns,
                                                        packed_allowed, prefix_reuse_inputs, prompt_allowed,
                                                        whole_pass)
from taskmllm.model.processor import positions


def context(mask: list[list[int]], image: list[list[int]], hidden: int = 4, seed: int = 0) -> GenerationContext:
    gen = torch.Generator().manual_seed(seed)
    mask_t = torch.tensor(mask)
    emb = torch.randn(*mask_t.shape, hidden, generator=gen, dtype=torch.float64)
    return GenerationContext(torch.zeros_like(mask_t), mask_t, torch.tensor(image).bool(), emb)


def test_left_padded_layout_by_hand():
    ctx = context(mask=[[0, 1, 1, 1, 1, 1, 1],   # prefix cols 1-2, image 3-4, suffix 5-6
                        [1, 1, 1, 1, 1, 1, 1],   # image first (cols 0-1): no prefix, suffix 2-6
                        [0, 0, 0, 1, 1, 1, 1]],  # no image: prefix 3-5, its last token 6 is computed
                  image=[[0, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7])
    text = prefix_reuse_inputs(ctx)
    assert text.reuses_prefix
    assert text.prefix.long().tolist() == [[0, 1, 1, 0, 0, 0, 0], [0] * 7, [0, 0, 0, 1, 1, 1, 0]]
    assert text.text_mask.long().tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert text.position_ids[0, 3:].tolist() == [2, 3]
    assert text.position_ids[1].tolist() == [0, 1, 2, 3, 4]
    assert text.position_ids[2, 4].item() == 3
    emb = ctx.inputs_embeds
    assert torch.equal(text.inputs_embeds[0, 3:], emb[0, 5:]) and not text.inputs_embeds[0, :3].any()
    assert torch.equal(text.inputs_embeds[1], emb[1, 2:])
    assert torch.equal(text.inputs_embeds[2, 4], emb[2, 6]) and not text.inputs_embeds[2, :4].any()


def test_right_padded_layout_by_hand():
    ctx = context(mask=[[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], image=[[0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    text = prefix_reuse_inputs(ctx)
    assert text.prefix.long().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert text.text_mask.long().tolist() == [[1, 1], [1, 1]]
    assert text.position_ids.tolist() == [[1, 2], [2, 3]]
    assert torch.equal(text.inputs_embeds[0], ctx.inputs_embeds[0, 2:4])


def test_no_prefix_anywhere_means_the_whole_text():
    ctx = context(mask=[[1, 1, 1]], image=[[1, 0, 0]])
    assert prefix_reuse_inputs(ctx) is None
    whole = whole_pass(ctx)
    assert not whole.reuses_prefix and whole.text_mask.tolist() == [[True, True]]


def test_packed_mask_by_hand():
    """Prompt of 3 columns (the first is padding), two extra columns of which the first is padding: the prompt
    never sees the extra columns; an extra column sees its prefix, the real suffix up to itself, and itself."""
    prompt = prompt_allowed(torch.tensor([[0, 1, 1]]), 1, 3, torch.device("cpu"))
    assert prompt.long().tolist() == [[[1, 0, 0], [0, 1, 0], [0, 1, 1]]], "padding attends to itself only"
    ctx = context(mask=[[0, 1, 1]], image=[[0, 0, 1]])
    text = whole_pass(ctx)
    text.prefix = torch.tensor([[False, True, False]])
    text.text_mask = torch.tensor([[False, True]])
    got = packed_allowed(prompt, text)[0, 0].long().tolist()
    assert got == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 0, 1]]


def test_prompt_allowed_reads_every_mask_form():
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    cpu = torch.device("cpu")
    assert torch.equal(prompt_allowed(None, 2, 3, cpu), causal.expand(2, -1, -1))
    ready = torch.tensor([[[[True, False, False], [True, True, False], [False, True, True]]]])
    assert torch.equal(prompt_allowed(ready, 1, 3, cpu)[0], ready[0, 0])
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~ready, torch.finfo(torch.float32).min)
    assert torch.equal(prompt_allowed(additive, 1, 3, cpu), prompt_allowed(ready, 1, 3, cpu))
    with pytest.raises(InputError, match="cannot read an attention mask of shape"):
        prompt_allowed(torch.ones(1, 2, 3, 3), 1, 3, cpu)


def test_window_and_cache_checks():
    llama = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=10)
    assert full_attention_for(llama, 10_000)
    mistral = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=10, sliding_window=4)
    assert full_attention_for(mistral, 4) and not full_attention_for(mistral, 5), "a window shorter than the forward"
    assert not is_empty_cache(None) and is_empty_cache(DynamicCache())
    assert is_empty_cache(StaticCache(config=llama, max_cache_len=8))
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    assert not is_empty_cache(filled), "a cache holding columns is not where a prompt starts"


@pytest.mark.parametrize("target", ["dynamic", "static"])
def test_keep_prompt_columns_writes_the_prompt_into_the_callers_cache(target):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=10)
    packed = DynamicCache()
    keys = [torch.randn(1, 2, 5, 8) for _ in range(2)]
    for i, k in enumerate(keys):
        packed.update(k, -k, i)
    cache = DynamicCache() if target == "dynamic" else StaticCache(config=cfg, max_cache_len=6)
    keep_prompt_columns(packed, cache, 3)
    assert cache.get_seq_length() == 3
    for i, k in enumerate(keys):
        assert torch.equal(cache.layers[i].keys[:, :, :3], k[:, :, :3])
        assert torch.equal(cache.layers[i].values[:, :, :3], -k[:, :, :3])
    with pytest.raises(InputError, match="fewer than the prompt's 6"):
        keep_prompt_columns(packed, DynamicCache(), 6)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_the_whole_text_pass_and_the_prompt_alone(padding_side, attn):
    """Oracles: transformers' decoder over the whole no-image text (its last hidden state), and over the prompt
    alone (every real column). The packed forward appends the text after the first visual token to the prompt."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=10, attn_implementation=attn)
    decoder = LlamaModel(cfg).double().eval()
    # the oracles run with SDPA: transformers' eager attention in float64 turns a left-padded row into NaN (its
    # additive minimum plus a negative score overflows to -inf on every column)
    oracle = LlamaModel(LlamaConfig(**{**cfg.to_dict(), "attn_implementation": "sdpa"})).double().eval()
    oracle.load_state_dict(decoder.state_dict())
    image = [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    if padding_side == "left":
        mask = [[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    else:
        mask = [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
        image[1] = [0, 0, 1, 1, 0, 0, 0, 0]
    ctx = context(mask, image, hidden=32)
    pos = positions(ctx.attention_mask)
    with torch.no_grad():
        alone = oracle(inputs_embeds=ctx.inputs_embeds, attention_mask=ctx.attention_mask, position_ids=pos,
                        use_cache=False).last_hidden_state
        whole = whole_pass(ctx)
        want = oracle(inputs_embeds=whole.inputs_embeds, attention_mask=whole.text_mask.long(),
                       position_ids=whole.position_ids, use_cache=False).last_hidden_state[:, -1]
        text = prefix_reuse_inputs(ctx)
        allowed = packed_allowed(prompt_allowed(ctx.attention_mask, 3, 8, torch.device("cpu")), text)
        got = decoder(inputs_embeds=torch.cat([ctx.inputs_embeds, text.inputs_embeds], 1),
                      attention_mask=attention_bias(allowed, decoder, torch.float64),
                      position_ids=torch.cat([pos, text.position_ids], 1), use_cache=False).last_hidden_state
    assert text.inputs_embeds.shape[1] < whole.inputs_embeds.shape[1], "the packed pass must compute fewer tokens"
    tol = 1e-10 if attn == "sdpa" else 1e-6  # transformers' eager attention takes its softmax in float32
    torch.testing.assert_close(got[:, -1], want, rtol=tol, atol=tol)
    real = ctx.attention_mask.bool()
    torch.testing.assert_close(got[:, :8][real], alone[real], rtol=tol, atol=tol)
