"""VAR: redistribution against an explicit-loop oracle, invariants on a real model's attention, identity,
sink calibration on a model with a planted massive dimension, KV-cache consistency and scoped state."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.interventions import VAR, calibrate_sink_dims, context_for, redistribute
from taskmllm.model.interventions.hooks import attention_module, decoder_layers
from taskmllm.model.interventions.var import STATE_ATTR
from tests.model.intervention_models import PROMPTS, images, plant_sink, varied_model

P, RHO, TAU, SINK_DIM = 0.6, 0.5, 5.0, 7


@pytest.fixture(scope="module")
def sink_model(tokenizer):
    """Eager, with BOS carrying a massive activation in dimension 7 (a planted sink)."""
    m = varied_model(tokenizer, attn="eager")
    plant_sink(m, tokenizer.bos_token_id, SINK_DIM)
    return m


def reference_row(row, sinks, image, p, rho, min_img):
    """One attention row (list of floats) -> (new row, selected), with explicit loops."""
    a_img = sum(a for a, i in zip(row, image) if i)
    a_vns = sum(a for a, i, s in zip(row, image, sinks) if i and not s)
    if not (a_img >= min_img and a_vns > 0 and a_vns / a_img >= rho):
        return list(row), False
    freed = sum(p * a for a, s in zip(row, sinks) if s)
    out = []
    for a, i, s in zip(row, image, sinks):
        if s:
            out.append((1 - p) * a)
        elif i:
            out.append(a + freed * a / a_vns)
        else:
            out.append(a)
    return out, True


def check_invariants(before, after, selected, sinks, image, p):
    """Rows sum to 1; unselected rows unchanged; sink columns x (1-p); freed mass only on non-sink image tokens,
    in proportion to their attention."""
    torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)), atol=1e-5, rtol=0)
    bsz, heads, q, _ = before.shape
    for b in range(bsz):
        vns = image[b] & ~sinks[b]
        for h in range(heads):
            for i in range(q):
                x, y = before[b, h, i], after[b, h, i]
                if not selected[b, h, i]:
                    assert torch.equal(x, y)
                    continue
                torch.testing.assert_close(y[sinks[b]], (1 - p) * x[sinks[b]])
                assert torch.equal(y[~sinks[b] & ~image[b]], x[~sinks[b] & ~image[b]])
                gain = y[vns] - x[vns]
                torch.testing.assert_close(gain.sum(), p * x[sinks[b]].sum(), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(gain, x[vns] / x[vns].sum() * gain.sum(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("rho", [RHO, 0.0])
def test_redistribute_matches_loop_oracle_and_invariants(rho):
    g = torch.Generator().manual_seed(0)
    weights = torch.softmax(3 * torch.randn(3, 3, 6, 10, generator=g), -1)
    image = torch.zeros(3, 10, dtype=torch.bool)
    image[:, 2:8] = True
    sinks = torch.zeros(3, 10, dtype=torch.bool)
    sinks[0, [0, 3]] = True  # BOS-like text sink + one image sink
    sinks[1, [0, 9]] = True
    sinks[2, 2:8] = True  # every image token a sink: nothing to move the attention to, never selected
    new, selected = redistribute(weights, sinks, image, P, rho, 0.2)
    assert not selected[2].any()
    for b in range(3):
        for h in range(3):
            for i in range(6):
                row, sel = reference_row(weights[b, h, i].tolist(), sinks[b].tolist(), image[b].tolist(), P, rho, 0.2)
                assert bool(selected[b, h, i]) == sel
                torch.testing.assert_close(new[b, h, i], torch.tensor(row), atol=1e-6, rtol=1e-5)
    assert 0 < int(selected.sum()) < selected.numel(), "the case must have selected and unselected rows"
    check_invariants(weights, new, selected, sinks, image, P)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_p_zero_is_bit_identical(tokenizer, attn):
    m = varied_model(tokenizer, attn=attn)
    plant_sink(m, m.tokenizer.bos_token_id, SINK_DIM)
    batch = m.processor(PROMPTS, images())
    base = m.generate(batch, max_new_tokens=10)
    var = VAR(p=0.0, tau=TAU, sink_dims=[SINK_DIM], mode="paper")
    out = m.generate(batch, max_new_tokens=10, intervention=var)
    assert out.sequences == base.sequences
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, base.hidden_states))
    assert var.sinks[0].any(), "sinks are still found (for inspection) at p = 0"
    with torch.no_grad():
        want = m(batch).logits
        with VAR(p=0.0, tau=TAU, sink_dims=[SINK_DIM], mode="paper").attach(m, batch):
            got = m(batch).logits
    assert torch.equal(got, want)


def test_attention_function_is_exact_eager_when_no_sink_is_found(sink_model):
    """Rows are selected but no key is a sink (dimension 3 carries no massive activation): every factor is exactly
    1, so the registered attention function must reproduce transformers' eager attention bit for bit."""
    batch = sink_model.processor(PROMPTS, images())
    with torch.no_grad():
        want = sink_model(batch).logits
        var = VAR(p=P, tau=TAU, sink_dims=[3], mode="paper")
        with var.attach(sink_model, batch):
            got = sink_model(batch).logits
    assert torch.equal(got, want)
    assert any(s.any() for s in var.selected_heads.values()) and not any(s.any() for s in var.sinks.values())


def test_invariants_on_the_model_attention(sink_model):
    """Layer 0 sees the same inputs with and without VAR: compare its attention rows directly."""
    m = sink_model
    batch = m.processor(PROMPTS, images())
    ctx = context_for(m, batch)
    kw = dict(inputs_embeds=ctx.inputs_embeds, attention_mask=ctx.attention_mask, output_attentions=True,
              position_ids=(ctx.attention_mask.cumsum(-1) - 1).clamp(min=0))
    var = VAR(p=P, rho=RHO, tau=TAU, sink_dims=[SINK_DIM], mode="paper")
    with torch.no_grad():
        before = m.llm(**kw).attentions[0]
        with var.attach(m, ctx):
            after = m.llm(**kw).attentions[0]
    sinks = var.sinks[0]
    bos = batch.input_ids == m.tokenizer.bos_token_id
    assert torch.equal(sinks, bos), "the planted BOS is exactly the sink set"
    selected = var.selected_heads[0]
    assert selected[0].any() and selected[2].any() and not selected[1].any()  # sample 1 has no image
    check_invariants(before, after, selected, sinks, ctx.image_mask, P)
    assert not torch.equal(before, after)


def test_cache_recompute_batch_and_scoped_state(sink_model):
    m = sink_model
    ims = images()
    batch = m.processor(PROMPTS, ims)
    var = VAR(p=P, rho=RHO, tau=TAU, sink_dims=[SINK_DIM], mode="paper")
    base = m.generate(batch, max_new_tokens=10)
    cached = m.generate(batch, max_new_tokens=10, intervention=var)
    assert var.selected_counts[0].sum() > 0
    assert var.sinks[0].shape[1] > batch.input_ids.shape[1], "sink flags cover the generated positions too"
    full = m.generate(batch, max_new_tokens=10, intervention=var, use_cache=False)
    assert cached.sequences == full.sequences
    assert cached.sequences != base.sequences, "VAR should change some generation (else the checks are weak)"
    for b, prompt in enumerate(PROMPTS):
        alone = m.generate(m.processor(prompt, ims[b]), max_new_tokens=10, intervention=var).sequences[0]
        assert alone == cached.sequences[b]
    assert m.llm.config._attn_implementation == "eager"
    assert not any(hasattr(attention_module(d), STATE_ATTR) for d in decoder_layers(m.llm))
    assert not any(d._forward_pre_hooks for d in decoder_layers(m.llm))


def test_sdpa_model_decodes_as_the_eager_one(tokenizer, sink_model):
    """On an SDPA model VAR's layers run its eager attention (SDPA passes no mask while decoding one query):
    the same rows are redistributed and the same tokens come out as on the eager model."""
    m = varied_model(tokenizer, attn="sdpa")
    plant_sink(m, tokenizer.bos_token_id, SINK_DIM)
    batch = m.processor(PROMPTS, images())
    eager_var, sdpa_var = (VAR(p=P, rho=RHO, tau=TAU, sink_dims=[SINK_DIM], mode="paper") for _ in range(2))
    want = sink_model.generate(batch, max_new_tokens=8, intervention=eager_var)
    got = m.generate(batch, max_new_tokens=8, intervention=sdpa_var)
    assert got.sequences == want.sequences
    assert sum(int(c.sum()) for c in sdpa_var.selected_counts.values()) > 0
    for layer, counts in eager_var.selected_counts.items():
        assert torch.equal(sdpa_var.selected_counts[layer], counts)
        assert torch.equal(sdpa_var.sinks[layer], eager_var.sinks[layer])


def test_restored_after_exception_and_other_model_untouched(tokenizer, sink_model):
    other = varied_model(tokenizer, seed=5)
    batch = sink_model.processor(PROMPTS, images())
    with pytest.raises(RuntimeError):
        with VAR(p=P, tau=TAU, sink_dims=[SINK_DIM], mode="paper").attach(sink_model, batch):
            assert sink_model.llm.config._attn_implementation == "taskmllm_var"
            assert other.llm.config._attn_implementation == "sdpa"
            raise RuntimeError("boom")
    assert sink_model.llm.config._attn_implementation == "eager"
    assert not any(hasattr(attention_module(d), STATE_ATTR) for d in decoder_layers(sink_model.llm))
    assert not any(d._forward_pre_hooks for d in decoder_layers(sink_model.llm))


def test_calibration_finds_the_planted_dimension(tokenizer):
    m = varied_model(tokenizer, layers=2, init=0.02)
    assert calibrate_sink_dims(m, tau=TAU) == [], "a plain random model has no massive activation"
    plant_sink(m, tokenizer.bos_token_id, 11)
    assert calibrate_sink_dims(m, tau=TAU) == [11]
    var = VAR(tau=TAU, mode="paper")
    assert var.dims_for(m) == [11]
    with pytest.raises(ConfigError, match="sqrt"):
        calibrate_sink_dims(m, tau=20.0)  # |x[d]|/RMS(x) <= sqrt(64) = 8


def test_sink_flags_equal_phi_rule():
    from taskmllm.model.interventions.sinks import sink_flags, sink_values

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 20, 64, generator=g)
    hidden[0, 4, 9] = 40.0  # phi ~ 7.5 in dim 9
    hidden[1, 2, 3] = -40.0  # sign does not matter
    hidden[2, 5] = 0.0  # a zero vector (a padding embedding) is no sink
    for dims in ([9], [3, 9], []):
        want = torch.tensor([[max([abs(float(hidden[b, t, d])) for d in dims] or [0.0])
                              / max(float(hidden[b, t].pow(2).mean().sqrt()), 1e-30)
                              for t in range(20)] for b in range(3)])
        torch.testing.assert_close(sink_values(hidden, dims), want)
        assert torch.equal(sink_flags(hidden, dims, TAU), want >= TAU)
        if dims:  # the dimensions as an index tensor (VAR's hook passes several so), and bf16 states
            assert torch.equal(sink_flags(hidden, torch.tensor(dims), TAU), want >= TAU)
            assert torch.equal(sink_flags(hidden.bfloat16(), dims, TAU), sink_flags(hidden.bfloat16().float(), dims,
                                                                                     TAU))
    assert sink_flags(hidden, [3, 9], TAU).nonzero().tolist() == [[0, 4], [1, 2]]
