"""Attention maps against attention weights read by hand from eager ``output_attentions`` of each sample alone
(unpadded), with and without an intervention; the heads an intervention selected; generated answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.interventions import VHR, ZeroTuning
from taskmllm.model.interventions.attention_map import attention_maps, compare_attention_maps
from taskmllm.model.processor import Batch
from tests.model.intervention_models import PROMPTS, images, varied_model

ANSWERS = [[5, 9, 12], [7, 8], [3]]  # different lengths; the last sample's answer is one token


@pytest.fixture(scope="module")
def model(tokenizer):
    return varied_model(tokenizer, attn="sdpa")  # attention_maps switches to eager itself


def by_hand(model, prompt, image, answer, pairs, intervention=None):
    """One sample alone: run prompt + answer[:-1] with eager weights; average, over the rows that predict the answer
    tokens and the given (layer, head) pairs, the attention to the image positions; reshape to ``model.grid``."""
    single = model.processor(prompt, image)
    ids = torch.cat([single.input_ids, torch.tensor([answer[:-1]], dtype=torch.long)], 1)
    full = Batch(ids, torch.ones_like(ids), None, single.pixel_values, single.frames_per_sample, single.image_sizes)
    previous = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            visual = model.encode_images(full.pixel_values)[1]
            emb = model.embed(full.input_ids, visual)
            if intervention is None:
                att = model.llm(inputs_embeds=emb, output_attentions=True).attentions
            else:
                with intervention.attach(model, single):
                    att = model.llm(inputs_embeds=emb, output_attentions=True).attentions
    finally:
        model.llm.set_attn_implementation(previous)
    n = single.input_ids.shape[1]
    cols = [i for i, t in enumerate(ids[0].tolist()) if t == model.image_id]
    rows = list(range(n - 1, n - 1 + len(answer)))
    total = np.zeros(len(cols))
    for layer, head in pairs:
        for r in rows:
            total += np.array([float(att[layer][0, head, r, c]) for c in cols]) / len(rows)
    return (total / len(pairs)).reshape(model.grid)


@pytest.mark.parametrize("with_zt", [False, True], ids=["plain", "ZeroTuning"])
def test_maps_equal_weights_read_by_hand(model, with_zt):
    zt = ZeroTuning(gamma=4.0, heads=[(0, 1), (2, 3)]) if with_zt else None
    ims = images()
    batch = model.processor(PROMPTS, ims)
    res = attention_maps(model, batch, zt, answers=ANSWERS, layers=[1, 2])
    assert model.llm.config._attn_implementation == "sdpa", "restored"
    assert res.maps[1] is None, "a text-only sample has no map"
    assert sorted(res.heads) == [1, 2] and all(m.all() for m in res.heads.values())
    pairs = [(layer, h) for layer in (1, 2) for h in range(4)]
    for b in (0, 2):
        want = by_hand(model, PROMPTS[b], ims[b], ANSWERS[b], pairs, zt)
        assert res.maps[b].shape == model.grid and res.maps[b].dtype == np.float32
        np.testing.assert_allclose(res.maps[b], want, rtol=1e-4, atol=1e-6)
    explicit = attention_maps(model, batch, zt, answers=ANSWERS, heads={2: [3]})
    np.testing.assert_allclose(explicit.maps[0], by_hand(model, PROMPTS[0], ims[0], ANSWERS[0], [(2, 3)], zt),
                               rtol=1e-4, atol=1e-6)


def test_selected_heads_and_comparison(model):
    ims = images()
    batch = model.processor(PROMPTS, ims)
    vhr = VHR(alpha=2.0, layers=[1, 3])
    with_vhr, without = compare_attention_maps(model, batch, vhr, max_new_tokens=5)
    assert with_vhr.answers == model.generate(batch, max_new_tokens=5, intervention=VHR(alpha=2.0, layers=[1, 3])
                                              ).sequences
    assert without.answers == model.generate(batch, max_new_tokens=5).sequences
    assert sorted(with_vhr.heads) == [1, 3]
    for layer in (1, 3):
        assert torch.equal(with_vhr.heads[layer], vhr.selected_heads[layer].cpu())
        assert torch.equal(without.heads[layer], with_vhr.heads[layer]), "both maps over the same heads"
    for b in (0, 2):
        pairs = [(layer, h) for layer in (1, 3) for h in vhr.selected_heads[layer][b].nonzero().flatten().tolist()]
        np.testing.assert_allclose(without.maps[b], by_hand(model, PROMPTS[b], ims[b], without.answers[b], pairs),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(with_vhr.maps[b], by_hand(model, PROMPTS[b], ims[b], with_vhr.answers[b], pairs,
                                                             VHR(alpha=2.0, layers=[1, 3])), rtol=1e-4, atol=1e-6)
    assert with_vhr.maps[1] is None and without.maps[1] is None
    with pytest.raises(ConfigError, match="needs an intervention"):
        attention_maps(model, batch, None, heads="selected")
