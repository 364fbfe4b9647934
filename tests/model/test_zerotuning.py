"""ZeroTuning: the attention of the chosen heads against the paper's post-softmax formula (eager weights), only the
chosen heads change, the first *real* token is the one scaled, SDPA == eager, KV cache == recomputation, batched ==
one by one, scoped hooks; profiling and gamma calibration against hand-built score callbacks and hand-computed
scores."""

from __future__ import annotations

import math

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.interventions import (ZeroTuning, accuracy_score, all_heads, calibrate_from_profile,
                                          calibrate_gamma, context_for, entropy_score, gradient_profile,
                                          likelihood_score, profile_heads)
from taskmllm.model.interventions.hooks import attention_module, decoder_layers
from tests.model.intervention_models import PROMPTS, images, varied_model

GAMMAS = {(1, 0): 3.0, (1, 2): 0.5, (2, 1): 2.0}


@pytest.fixture(scope="module")
def models(tokenizer):
    return {attn: varied_model(tokenizer, attn=attn) for attn in ("eager", "sdpa")}


def _attentions(model, batch, intervention=None):
    ctx = context_for(model, batch)
    kw = dict(inputs_embeds=ctx.inputs_embeds, attention_mask=ctx.attention_mask, output_attentions=True,
              position_ids=(ctx.attention_mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        if intervention is None:
            return model.llm(**kw).attentions, ctx
        with intervention.attach(model, batch):
            return model.llm(**kw).attentions, ctx


def oracle(row, gamma, first):
    """The paper's post-softmax form, element by element: a_0' = g a_0 / D, a_i' = a_i / D, D = (g - 1) a_0 + 1."""
    a0 = float(row[first])
    d = (gamma - 1.0) * a0 + 1.0
    return torch.tensor([gamma * a0 / d if i == first else float(a) / d for i, a in enumerate(row)])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_chosen_heads_follow_the_formula_and_only_they_change(models, padding):
    m = models["eager"]
    batch = m.processor(PROMPTS, images(), padding_side=padding)
    before, ctx = _attentions(m, batch)
    only_layer_1 = ZeroTuning(gammas={k: v for k, v in GAMMAS.items() if k[0] == 1})
    after, _ = _attentions(m, batch, only_layer_1)
    assert torch.equal(before[0], after[0]), "layers before the first chosen one are untouched"
    assert torch.equal(before[1][:, [1, 3]], after[1][:, [1, 3]]), "unchosen heads of the layer are untouched"
    real = ctx.attention_mask.bool()
    for b in range(real.shape[0]):
        first = int(real[b].nonzero()[0])  # the first real token: BOS, after the left padding
        assert int(batch.input_ids[b, first]) == m.tokenizer.bos_token_id
        rows = real[b].nonzero().flatten().tolist()
        for head, gamma in ((0, 3.0), (2, 0.5)):
            for q in rows:
                want = oracle(before[1][b, head, q], gamma, first)
                torch.testing.assert_close(after[1][b, head, q], want, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(before[1][b, 0][rows], after[1][b, 0][rows])


def test_sdpa_equals_eager_cache_equals_recompute_batched_equals_single(models):
    zt = ZeroTuning(gammas=GAMMAS)
    ims = images()
    batch = models["eager"].processor(PROMPTS, ims)
    real = batch.attention_mask.bool()
    logits, seqs = {}, {}
    for attn, m in models.items():
        with torch.no_grad(), zt.attach(m, batch):
            logits[attn] = m(batch).logits
        seqs[attn] = m.generate(batch, max_new_tokens=8, intervention=zt).sequences
    torch.testing.assert_close(logits["sdpa"][real], logits["eager"][real], atol=1e-4, rtol=1e-4)
    assert seqs["sdpa"] == seqs["eager"]
    m = models["sdpa"]
    assert m.generate(batch, max_new_tokens=8, intervention=zt, use_cache=False).sequences == seqs["sdpa"]
    for b, prompt in enumerate(PROMPTS):
        alone = m.generate(m.processor(prompt, ims[b]), max_new_tokens=8, intervention=zt).sequences[0]
        assert alone == seqs["sdpa"][b]
    strong = ZeroTuning(gamma=50.0)  # every head: the change must reach the tokens (else the checks are weak)
    assert m.generate(batch, max_new_tokens=8, intervention=strong).sequences != m.generate(
        batch, max_new_tokens=8).sequences


def test_unpadded_decode_steps_take_the_one_row_bias_as_recomputation_does(models, monkeypatch):
    """A one-prompt batch decodes without a mask: each step's mask is the initial-token bias alone, sliced from a
    per-layer tensor (rebuilt when the keys outgrow it). Recomputing the whole sequence builds it from the causal
    mask instead: the same tokens and states."""
    from taskmllm.model.interventions.zerotuning import ZeroTuningSession

    m = models["sdpa"]
    zt = ZeroTuning(gammas=GAMMAS)
    batch = m.processor(PROMPTS[1], images()[0])
    n = batch.input_ids.shape[1] + 4  # more new tokens than the prompt has: the bias is rebuilt once
    built, original = [], ZeroTuningSession._one_row_bias

    def spy(self, layer, log_gamma, k_len, hidden):
        before = self._decode_bias.get(layer)
        out = original(self, layer, log_gamma, k_len, hidden)
        built.append(self._decode_bias[layer] is not before)
        return out

    eos = m.tokenizer.eos_token
    m.tokenizer.eos_token = None  # exactly n tokens
    try:
        monkeypatch.setattr(ZeroTuningSession, "_one_row_bias", spy)
        cached = m.generate(batch, max_new_tokens=n, intervention=zt)
        monkeypatch.undo()
        full = m.generate(batch, max_new_tokens=n, intervention=zt, use_cache=False)
    finally:
        m.tokenizer.eos_token = eos
    layers = len({layer for layer, _ in GAMMAS})
    assert len(built) == layers * (n - 1) and sum(built) == 2 * layers, "built at the first step and once more"
    assert cached.sequences == full.sequences
    torch.testing.assert_close(cached.hidden_states[0], full.hidden_states[0], atol=1e-4, rtol=1e-4)  # cache vs not


def test_hooks_are_scoped_and_bad_heads_raise(models):
    m = models["sdpa"]
    batch = m.processor(PROMPTS, images())
    modules = [attention_module(d) for d in decoder_layers(m.llm)]
    with pytest.raises(RuntimeError):
        with ZeroTuning(gamma=2.0).attach(m, batch):
            assert all(mod._forward_pre_hooks for mod in modules)
            raise RuntimeError("boom")
    assert not any(mod._forward_pre_hooks for mod in modules)
    with pytest.raises(ConfigError, match=r"\(1, 4\).*4 layers of 4 heads"):
        ZeroTuning(gamma=2.0, heads=[(1, 4)]).attach(m, batch)
    with pytest.raises(ConfigError, match=r"\(4, 0\)"):
        ZeroTuning(gamma=2.0, heads=[(4, 0)]).attach(m, batch)
    assert ZeroTuning(gamma=2.0, heads=[(-1, 0)]).head_gammas(4, 4).keys() == {3}


# ---------------------------------------------------------------------------------- profiling / calibration
def _chosen(intervention, layers=2, heads=2):
    """``{(layer, head): gamma}`` of a ZeroTuning on a ``layers x heads`` model (empty for None)."""
    if intervention is None:
        return {}
    return {(l, h): float(g[h]) for l, g in intervention.head_gammas(layers, heads).items() for h in range(heads)}


def test_profile_heads_classifies_against_a_known_score():
    """A score with a known response per head (linear in log gamma): (0, 0) and (1, 1) gain from a larger gamma,
    (0, 1) from a smaller one, (1, 0) is indifferent."""
    response = {(0, 0): 1.0, (1, 1): 0.5, (0, 1): -2.0, (1, 0): 0.0}

    def score(intervention):
        return sum(response[head] * math.log(g) for head, g in _chosen(intervention).items())

    profile = profile_heads(score, [(0, 0), (0, 1), (1, 0), (1, 1)], gamma_up=2.0, gamma_down=0.5,
                            tolerance=1e-9)
    assert profile.up[(0, 1)] == pytest.approx(-2.0 * math.log(2.0)) and profile.base == 0.0
    assert profile.heads("up") == [(0, 0), (1, 1)]
    assert profile.heads("down") == [(0, 1)]
    assert profile.heads("neutral") == [(1, 0)]
    assert profile.dominant == "up"

    def peaked(intervention):  # best at gamma = 1.5 on both up-effective heads; None = gamma 1 everywhere
        chosen = _chosen(intervention)
        return -sum((math.log(chosen.get(head, 1.0)) - math.log(1.5)) ** 2 for head in [(0, 0), (1, 1)])

    cal = calibrate_from_profile(peaked, profile, gammas=[0.5, 1.25, 1.5, 2.0])
    assert cal.gamma == 1.5 and cal.heads == [(0, 0), (1, 1)] and cal.score == pytest.approx(0.0)
    assert [g for g, _ in cal.table] == [1.0, 1.25, 1.5, 2.0], "only the up side of 1, plus the identity"
    assert cal.intervention().settings() == {"gamma": 1.5, "heads": [[0, 0], [1, 1]], "gammas": None}
    with pytest.raises(ConfigError):
        profile_heads(score, [(0, 0)], gamma_up=0.9)


def test_scores_against_hand_computed_values(models):
    m = models["eager"]
    batch = m.processor(PROMPTS, images(), padding_side="right")
    yes, no = 5, 9  # any two token ids: the scores only compare them
    with torch.no_grad():
        full = m(batch).logits
    last = batch.attention_mask.sum(-1) - 1
    pair = torch.stack([full[torch.arange(3), last, yes], full[torch.arange(3), last, no]], -1)
    labels = [0, 1, 1]
    want_acc = sum(int(pair[b].argmax()) == labels[b] for b in range(3)) / 3
    assert accuracy_score(m, batch, [yes, no], labels)(None) == pytest.approx(want_acc)
    logp = pair.log_softmax(-1)
    assert likelihood_score(m, batch, [yes, no], labels)(None) == pytest.approx(
        float(sum(logp[b, labels[b]] for b in range(3)) / 3), rel=1e-5)
    probs = pair.softmax(-1)
    assert entropy_score(m, batch, [yes, no])(None) == pytest.approx(
        float((probs * probs.log()).sum(-1).mean()), rel=1e-5)
    # under an intervention the score changes, and the plain model is back afterwards
    strong = ZeroTuning(gamma=50.0)
    assert likelihood_score(m, batch, [yes, no], labels)(strong) != likelihood_score(m, batch, [yes, no], labels)(None)
    cal = calibrate_gamma(entropy_score(m, batch), all_heads(m, layers=[0]), gammas=[0.5, 2.0])
    assert [g for g, _ in cal.table] == [0.5, 1.0, 2.0]
    assert cal.score == max(s for _, s in cal.table)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradient_profile_is_the_derivative_of_the_scaled_score(models, attn):
    """The gradient profile's slope per head equals the central finite difference of the real ZeroTuning's
    likelihood score in log gamma (oracle: two forwards per head with gamma = exp(+-eps)), and it classifies a
    head as profile_heads would at small scales."""
    m = models[attn]
    batch = m.processor(PROMPTS, images(), padding_side="left")
    yes, no, labels = 5, 9, [0, 1, 1]
    score = likelihood_score(m, batch, [yes, no], labels)
    heads = [(0, 1), (1, 2), (3, 0)]
    profile = gradient_profile(m, batch, [yes, no], labels, heads=heads, gamma_up=2.0, gamma_down=0.5)
    assert profile.base == pytest.approx(score(None), rel=1e-5)
    assert set(profile.kinds) == set(heads)
    eps = 1e-2  # float32 scores: the difference is exact to ~1e-4 in slope
    slopes = {}
    for head in heads:
        slopes[head] = (profile.up[head] - profile.base) / math.log(2.0)
        numeric = (score(ZeroTuning(gamma=math.exp(eps), heads=[head]))
                   - score(ZeroTuning(gamma=math.exp(-eps), heads=[head]))) / (2 * eps)
        assert slopes[head] == pytest.approx(numeric, rel=2e-2, abs=2e-4), head
    assert max(abs(v) for v in slopes.values()) > 0.05, f"a head with a clear effect is among the checked: {slopes}"
    small = profile_heads(score, heads, gamma_up=math.exp(0.05), gamma_down=math.exp(-0.05))
    first_order = gradient_profile(m, batch, [yes, no], labels, heads=heads, gamma_up=math.exp(0.05),
                                   gamma_down=math.exp(-0.05))
    assert first_order.kinds == small.kinds
    with pytest.raises(ConfigError):
        gradient_profile(m, batch, [yes, no], labels, gamma_up=0.5)

def test_additive_mask_forms():
    """The three mask forms transformers hands an attention function, as one additive mask (hand-built)."""
    from taskmllm.model.interventions.masks import additive_mask

    low = torch.finfo(torch.float32).min
    causal = additive_mask(None, 2, 4, torch.float32, torch.device("cpu"))  # 2 new queries after 2 cached keys
    assert causal.tolist() == [[[[0.0, 0.0, 0.0, low], [0.0, 0.0, 0.0, 0.0]]]]
    allowed = torch.tensor([[[[True, False, True, True]]]])
    assert additive_mask(allowed, 1, 3, torch.float32, allowed.device).tolist() == [[[[0.0, low, 0.0]]]]
    additive = torch.tensor([[[[0.0, -5.0, 1.0, 7.0]]]])
    assert torch.equal(additive_mask(additive, 1, 3, torch.float32, additive.device), additive[..., :3])
