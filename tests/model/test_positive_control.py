"""Positive control: a tiny random Llama with a planted massive-activation dimension on the first token (BOS) and on
two visual tokens of every image. Sink calibration finds exactly that dimension; official-mode VAR finds exactly the
planted sinks and moves attention off them as the port of the official code does; ZeroTuning changes exactly the
heads that profiling picked."""

from __future__ import annotations

import pytest
import torch

from taskmllm.model.interventions import (VAR, ZeroTuning, all_heads, calibrate_sink_dims, context_for,
                                          likelihood_score, profile_heads)
from taskmllm.model.interventions.hooks import decoder_layers
from tests.model.intervention_models import PROMPTS, images, plant_image_sinks, plant_sink, varied_model
from tests.model.test_var_official import official_port

DIM, IMAGE_SINKS, TAU = 11, [2, 5], 4.0


@pytest.fixture(scope="module")
def planted(tokenizer):
    m = varied_model(tokenizer, attn="eager")
    assert calibrate_sink_dims(m, tau=TAU) == [], "the random model has no massive activation of its own"
    plant_sink(m, tokenizer.bos_token_id, DIM, value=1000.0)
    handle = plant_image_sinks(m, DIM, IMAGE_SINKS)
    yield m
    handle.remove()


def _attentions(model, ctx, intervention=None):
    kw = dict(inputs_embeds=ctx.inputs_embeds, attention_mask=ctx.attention_mask, output_attentions=True,
              position_ids=(ctx.attention_mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        if intervention is None:
            return model.llm(**kw).attentions
        with intervention.attach(model, ctx):
            return model.llm(**kw).attentions


def test_calibration_finds_the_planted_dimension(planted):
    assert calibrate_sink_dims(planted, tau=TAU) == [DIM]
    assert VAR().dims_for(planted) == [DIM], "VAR() calibrates at its default tau (0.5 * sqrt(64) = 4)"


def test_official_var_moves_attention_off_exactly_the_planted_sinks(planted):
    m = planted
    batch = m.processor(PROMPTS, images())
    ctx = context_for(m, batch)
    var = VAR(sink_dims=[DIM])  # official mode, p = 0.4 (the code's p_code = 0.6), rho = 0.5
    before, after = _attentions(m, ctx), _attentions(m, ctx, var)
    image = ctx.image_mask
    bos = batch.input_ids == m.tokenizer.bos_token_id
    planted_sinks = torch.zeros_like(image)
    for b in range(image.shape[0]):
        cols = image[b].nonzero().flatten()
        if len(cols):
            planted_sinks[b, cols[IMAGE_SINKS]] = True
    layer = var.resolved["layers"][0]
    assert var.resolved["layers"] == [2, 3]
    for l in var.resolved["layers"]:
        assert torch.equal(var.sinks[l][:, :image.shape[1]], bos | planted_sinks), "exactly the planted sinks"
    for l in range(layer):
        assert torch.equal(before[l], after[l]), "layers before the first VAR layer are untouched"
    changed_rows = 0
    for b in range(image.shape[0]):
        cols = image[b].nonzero().flatten()
        sink_idx = var.sinks[layer][b].nonzero().flatten().tolist()
        im, pa = (int(cols[0]), len(cols)) if len(cols) else (0, 0)
        _, changed, want = official_port(before[layer][b], sink_idx, im, pa, 1 - var.p, 1 - var.rho, 0.2, True)
        torch.testing.assert_close(after[layer][b], want, atol=1e-6, rtol=0)
        assert torch.equal(var.selected_heads[layer][b], changed)
        changed_rows += int(changed.sum())
        # where attention went down: exactly the sink columns (BOS and the planted image sinks) of changed rows
        delta = after[layer][b] - before[layer][b]
        lost = (delta < 0).any(0).any(0)
        if changed.any():
            assert torch.equal(lost, bos[b] | planted_sinks[b])
            gained = (delta > 0).any(0).any(0)
            assert not (gained & ~(image[b] & ~planted_sinks[b])).any(), "only non-sink image tokens gain"
        else:
            assert not lost.any()
    assert changed_rows > 0, "some rows after the image are redistributed (else the control is vacuous)"


def test_official_var_with_visual_sinks_is_cache_consistent_and_batch_independent(planted):
    m = planted
    ims = images()
    batch = m.processor(PROMPTS, ims)
    var = VAR(sink_dims=[DIM], rho=0.2, min_image_attention=0.05)  # selects more rows
    layer = decoder_layers(m.llm)[2]
    hooks_seen = []  # pre-hooks on a VAR layer at each forward: the sink test's runs in the prefill only
    spy = layer.register_forward_pre_hook(lambda module, args: hooks_seen.append(len(module._forward_pre_hooks)),
                                          prepend=True)
    try:
        cached = m.generate(batch, max_new_tokens=6, intervention=var)
    finally:
        spy.remove()
    assert hooks_seen[0] == 2 and set(hooks_seen[1:]) == {1} and len(hooks_seen) > 2
    assert sum(int(c.sum()) for c in var.selected_counts.values()) > 0
    assert var.sinks[2].shape[1] > batch.input_ids.shape[1] and not var.sinks[2][:, batch.input_ids.shape[1]:].any(), \
        "generated positions are never sinks in official mode"
    full = m.generate(batch, max_new_tokens=6, intervention=var, use_cache=False)
    assert cached.sequences == full.sequences
    for b, prompt in enumerate(PROMPTS):
        alone = m.generate(m.processor(prompt, ims[b]), max_new_tokens=6, intervention=var).sequences[0]
        assert alone == cached.sequences[b]


def test_zerotuning_changes_exactly_the_profiled_heads(planted):
    m = planted
    batch = m.processor(PROMPTS, images())
    ctx = context_for(m, batch)
    score = likelihood_score(m, batch, candidates=[5, 9], labels=[0, 1, 0])  # any labelled items will do
    profile = profile_heads(score, all_heads(m, layers=[0, 2]), gamma_up=2.0, gamma_down=0.5)
    chosen = profile.heads(profile.dominant)
    assert 0 < len(chosen) < 8, f"a profile that picks some heads but not all: {profile.kinds}"
    gamma = 2.0 if profile.dominant == "up" else 0.5
    before = _attentions(m, ctx)
    for layer in (0, 2):
        heads = [h for l, h in chosen if l == layer]
        after = _attentions(m, ctx, ZeroTuning(gamma=gamma, heads=[(layer, h) for h in heads]))
        for l in range(layer):
            assert torch.equal(before[l], after[l])
        real = ctx.attention_mask.bool()
        for h in range(4):
            same = torch.equal(before[layer][:, h], after[layer][:, h])
            assert same == (h not in heads), (layer, h, heads)
        for h in heads:  # and as the formula says, on the real rows of each sample
            for b in range(real.shape[0]):
                first = int(real[b].nonzero()[0])
                a = before[layer][b, h][real[b]]
                a0 = a[:, first: first + 1]
                d = (gamma - 1.0) * a0 + 1.0
                want = a / d
                want[:, first] = (gamma * a0 / d)[:, 0]
                torch.testing.assert_close(after[layer][b, h][real[b]], want, atol=1e-6, rtol=1e-5)
