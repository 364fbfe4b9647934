"""Identity settings of every intervention (VHR alpha = 1, VAR p = 0 in both modes, ZeroTuning gamma = 1) give
bit-identical logits and tokens: SDPA and eager, batch > 1 with an image-less sample, left and right padding."""

from __future__ import annotations

import pytest
import torch

from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from tests.model.intervention_models import PROMPTS, images, plant_sink, varied_model

SINK_DIM = 7
IDENTITIES = {
    "VHR": lambda: VHR(alpha=1.0, layers=[0, 1, 2, 3]),
    "VAR-official": lambda: VAR(p=0.0, sink_dims=[SINK_DIM]),
    "VAR-paper": lambda: VAR(p=0.0, tau=4.0, sink_dims=[SINK_DIM], mode="paper"),
    "ZeroTuning": lambda: ZeroTuning(gamma=1.0),
    "ZeroTuning-per-head": lambda: ZeroTuning(gammas={(0, 1): 1.0, (3, 2): 1.0}),
}


@pytest.fixture(scope="module")
def models(tokenizer):
    out = {}
    for attn in ("sdpa", "eager"):
        m = varied_model(tokenizer, attn=attn)
        plant_sink(m, tokenizer.bos_token_id, SINK_DIM, value=1000.0)  # VAR finds sinks (and still changes nothing)
        out[attn] = m
    return out


def _ran(name, intervention):
    """The intervention really ran (its selection / sink search), so the identity is not vacuous."""
    if name == "VHR":
        return any(s.any() for s in intervention.selected_heads.values())
    if name.startswith("VAR"):
        return any(s.any() for s in intervention.sinks.values())
    return True


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(IDENTITIES))
def test_identity_settings_are_bit_identical(models, name, attn, padding):
    m = models[attn]
    batch = m.processor(PROMPTS, images(), padding_side=padding)
    assert (batch.attention_mask == 0).any(), "the batch must be padded"
    with torch.no_grad():
        want = m(batch).logits
        intervention = IDENTITIES[name]()
        with intervention.attach(m, batch):
            got = m(batch).logits
    # VHR's no-image columns share the forward: a left-padding row (read by nothing) attends to itself there,
    # where transformers' eager mask spreads it evenly over every column; every real column is compared
    compared = batch.attention_mask.bool() if name == "VHR" else torch.ones_like(batch.attention_mask, dtype=bool)
    assert torch.equal(got[compared], want[compared])
    assert _ran(name, intervention)
    # tokens: the next token of every sample (its last real position), and on the left-padded batch a generation
    last = batch.attention_mask.sum(-1) - 1 if padding == "right" else torch.full((3,), batch.input_ids.shape[1] - 1)
    assert torch.equal(got[torch.arange(3), last].argmax(-1), want[torch.arange(3), last].argmax(-1))
    if padding == "left":
        base = m.generate(batch, max_new_tokens=6)
        intervention = IDENTITIES[name]()
        out = m.generate(batch, max_new_tokens=6, intervention=intervention)
        assert out.sequences == base.sequences
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, base.hidden_states))
        assert _ran(name, intervention)
