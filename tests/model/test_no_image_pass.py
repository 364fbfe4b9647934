"""VHR's no-image pass inputs: hand-built layouts, and the prefix-reusing pass against transformers' own decoder
computing the whole text."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, MistralConfig, StaticCache

from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.no_image_pass import (copy_prefix, is_full_attention_cache, prefix_cache,
                                                        prefix_reuse_inputs, whole_pass)
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
    assert text.prefix_length == 3 and text.source_length == 7
    assert text.attention_mask.tolist() == [[0, 1, 1, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1],
                                            [1, 1, 1, 0, 0, 0, 0, 1]]
    assert text.prefix_columns[0, 1:].tolist() == [1, 2] and text.prefix_columns[2].tolist() == [3, 4, 5]
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
    assert text.prefix_columns[0, 1].item() == 0 and text.prefix_columns[1].tolist() == [0, 1]
    assert text.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert text.position_ids.tolist() == [[1, 2], [2, 3]]
    assert torch.equal(text.inputs_embeds[0], ctx.inputs_embeds[0, 2:4])


def test_no_prefix_anywhere_means_no_reuse():
    assert prefix_reuse_inputs(context(mask=[[1, 1, 1]], image=[[1, 0, 0]])) is None


def test_only_empty_full_attention_caches_are_reused():
    llama = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=10)
    assert not is_full_attention_cache(None, 2)
    assert is_full_attention_cache(DynamicCache(), 2)
    assert is_full_attention_cache(DynamicCache(config=llama), 2)
    assert is_full_attention_cache(StaticCache(config=llama, max_cache_len=8), 2)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    assert not is_full_attention_cache(filled, 2), "a cache holding columns is not the prompt's"
    mistral = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=10, sliding_window=4)
    assert not is_full_attention_cache(DynamicCache(config=mistral), 2), "a sliding window drops columns"


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prefix_reuse_equals_the_whole_text_pass(padding_side):
    """Oracle: transformers' decoder over the whole no-image text. The reuse pass reads the prefix's keys and
    values from the cache of a forward over the full prompt (images included) and computes the rest."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=10, attn_implementation="sdpa")
    decoder = LlamaModel(cfg).double().eval()
    image = [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    if padding_side == "left":
        mask = [[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    else:
        mask = [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
        image[1] = [0, 0, 1, 1, 0, 0, 0, 0]
    ctx = context(mask, image, hidden=32)
    image_cache = DynamicCache()
    with torch.no_grad():
        decoder(inputs_embeds=ctx.inputs_embeds, attention_mask=ctx.attention_mask,
                position_ids=positions(ctx.attention_mask), cache=image_cache, use_cache=True)
        whole = whole_pass(ctx)
        want = decoder(inputs_embeds=whole.inputs_embeds, attention_mask=whole.attention_mask,
                       position_ids=whole.position_ids, use_cache=False).last_hidden_state[:, -1]
        text = prefix_reuse_inputs(ctx)
        cache = prefix_cache(text, 3, kv_heads=2, head_dim=8, dtype=torch.float64)
        for layer in range(3):  # all at once here; VHR copies each layer as the image pass reaches it
            copy_prefix(cache, image_cache, layer, text)
        got = decoder(inputs_embeds=text.inputs_embeds, attention_mask=text.attention_mask,
                      position_ids=text.position_ids, cache=cache, use_cache=True).last_hidden_state[:, -1]
    assert text.inputs_embeds.shape[1] < whole.inputs_embeds.shape[1], "the reuse pass must compute fewer tokens"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
