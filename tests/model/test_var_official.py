"""VAR's official mode against a port of the official code's selection and redistribution (seilk/VisAttnSink,
``HeadFork.run_logic`` + ``VARProcessor.attn_redist``, batch size 1, re-written here from its behaviour), and the
first-token-only identity (a BOS sink never triggers official VAR; paper mode moves BOS attention to the image)."""

from __future__ import annotations

import pytest
import torch

from taskmllm.model.interventions import VAR, redistribute
from tests.model.intervention_models import PROMPTS, images, plant_sink, varied_model

SINK_DIM = 7


# ------------------------------------------------------------------------------------------------ the port
def official_port(attn, sink_idx, im, pa, p_code, rho_code, summ, prefill):
    """One sample as the official code sees it (batch size 1, image span ``[im, im + pa)``).

    Args:
        attn: ``(H, Q, K)`` post-softmax attention of one layer; query ``q`` sits at position ``K - Q + q``.
        sink_idx: token indices found by the sink test (visual and text sinks together).
        p_code: the code's kept fraction; rho_code: the code's bound on the visual-sink share; summ: min image sum.
        prefill: the prompt pass (only rows at or after ``im + pa`` change); decode changes every forked row.

    Returns:
        ``(forked (H, Q) bool — HeadFork's candidates, changed (H, Q) bool, new attention (H, Q, K))``.
    """
    heads, q_len, k_len = attn.shape
    vis = [i for i in sink_idx if im <= i < im + pa]
    text = [i for i in sink_idx if not im <= i < im + pa]
    forked = torch.zeros(heads, q_len, dtype=torch.bool)
    changed = torch.zeros(heads, q_len, dtype=torch.bool)
    out = attn.clone()
    if not vis:  # HeadFork forks nothing in a layer without visual sinks
        return forked, changed, out
    for h in range(heads):
        for q in range(q_len):
            image = attn[h, q, im:im + pa]
            portion = sum(float(attn[h, q, i]) for i in vis) / float((image + 1e-6).sum())
            forked[h, q] = portion <= rho_code and float(image.sum()) >= summ
    for h in range(heads):
        for q in range(q_len):
            if not forked[h, q] or (prefill and k_len - q_len + q < im + pa):
                continue
            row, orig = attn[h, q].clone(), attn[h, q].clone()
            row[text] *= p_code
            row[vis] *= p_code
            budget = (orig[vis].sum() + orig[text].sum()) * (1 - p_code)
            non_sink = orig[im:im + pa].clone()
            non_sink[[i - im for i in vis]] = 0
            row[im:im + pa] += budget * non_sink / non_sink.sum()
            out[h, q] = row
            changed[h, q] = True
    return forked, changed, out


def _synthetic(seed, heads, q_len, k_len, spans, sinks):
    """A batch of attention rows with heavy sink columns; ``spans[b] = (im, pa)``; ``sinks[b]`` token indices."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(spans)
    logits = 2.0 * torch.randn(bsz, heads, q_len, k_len, generator=g)
    image = torch.zeros(bsz, k_len, dtype=torch.bool)
    sink = torch.zeros(bsz, k_len, dtype=torch.bool)
    for b, ((im, pa), idx) in enumerate(zip(spans, sinks)):
        image[b, im:im + pa] = True
        sink[b, idx] = True
        # sinks draw a lot of attention in some heads, little in others (so the share rule selects some rows)
        logits[b, :, :, idx] += torch.linspace(-1.0, 4.0, heads)[:, None, None]
    if q_len > 1:  # causal, the queries are the last q_len positions
        allowed = torch.arange(k_len)[None] <= torch.arange(k_len - q_len, k_len)[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1), sink, image


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_official_mode_matches_the_port(prefill):
    spans = [(3, 6), (2, 7), (4, 5), (1, 8)]
    sinks = [[0, 5], [0, 13], [0], [2, 4, 11]]  # visual+BOS; text sinks only (no gate); BOS only; two visual
    q_len, k_len = (14, 14) if prefill else (1, 16)
    weights, sink, image = _synthetic(0, 6, q_len, k_len, spans, sinks)
    p, rho, summ = 0.3, 0.35, 0.2  # our convention (moves 30%, non-sink share >= 0.35) = the code's 0.7, 0.65
    cols = torch.arange(k_len - q_len, k_len)
    last_image = torch.tensor([im + pa - 1 for im, pa in spans])
    rows = cols[None] > last_image[:, None]
    new, selected = redistribute(weights, sink, image, p, rho, summ, mode="official", rows=rows)
    _, forked_ours = redistribute(weights, sink, image, p, rho, summ, mode="official")
    changed_total = 0
    for b, ((im, pa), idx) in enumerate(zip(spans, sinks)):
        forked, changed, want = official_port(weights[b], idx, im, pa, 1 - p, 1 - rho, summ, prefill)
        assert torch.equal(forked_ours[b], forked), b
        assert torch.equal(selected[b], changed), b
        torch.testing.assert_close(new[b], want, atol=1e-6, rtol=0)
        changed_total += int(changed.sum())
    # the case exercises every branch: changed rows, forked-but-before-the-image rows, gated samples
    assert changed_total > 0
    assert not selected[1].any() and not selected[2].any(), "no visual sink: the layer is untouched"
    if prefill:
        assert (forked_ours & ~selected).any(), "some forked rows lie in or before the image"


@pytest.fixture(scope="module")
def bos_only(tokenizer):
    """BOS carries a massive dimension strong enough to stay a sink in every layer; nothing else is a sink."""
    models = {}
    for attn in ("sdpa", "eager"):
        m = varied_model(tokenizer, attn=attn)
        plant_sink(m, tokenizer.bos_token_id, SINK_DIM, value=1000.0)
        models[attn] = m
    return models


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_first_token_only_sink_is_an_identity_in_official_mode(bos_only, attn):
    m = bos_only[attn]
    batch = m.processor(PROMPTS, images())
    base = m.generate(batch, max_new_tokens=8)
    var = VAR(sink_dims=[SINK_DIM])  # official mode, default p and tau (tau = 0.5 * sqrt(64) = 4)
    out = m.generate(batch, max_new_tokens=8, intervention=var)
    bos = batch.input_ids == m.tokenizer.bos_token_id
    assert var.resolved["layers"] == [2, 3] and var.resolved["tau"] == 4.0
    for layer in var.resolved["layers"]:
        assert torch.equal(var.sinks[layer][:, :bos.shape[1]], bos), "BOS is the only sink, in every layer"
    assert out.sequences == base.sequences
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, base.hidden_states))
    with torch.no_grad():
        want = m(batch).logits
        with VAR(sink_dims=[SINK_DIM]).attach(m, batch):
            got = m(batch).logits
        with VAR(sink_dims=[SINK_DIM], mode="paper", layers=[2, 3]).attach(m, batch):
            paper = m(batch).logits
    assert torch.equal(got, want)
    assert not torch.allclose(paper, want), "paper mode moves the BOS attention onto the image (the contrast)"
