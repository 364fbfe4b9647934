"""Image reliance: answer NLL with the own image vs. another's (taskmllm.eval.reliance)."""

import numpy as np
import pytest
import torch

from taskmllm.data.sample import Sample
from taskmllm.errors import InputError
from taskmllm.eval.reliance import answer_nll, image_reliance


def _solid(rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (48, 48, 3)).copy()


def _samples(colors):
    names = {(255, 0, 0): "Red.", (0, 0, 255): "Blue."}
    return [Sample(id=f"s{i}", source="test", task="color", image=_solid(c),
                   turns=[("What color is the image?\n<image>", names[c])]) for i, c in enumerate(colors)]


def test_answer_nll_is_the_models_own_lm_loss_summed(tiny_model):
    """Oracle: the model's LM loss (a mean over supervised tokens) times their count, one sample at a time."""
    samples = _samples([(255, 0, 0), (0, 0, 255), (255, 0, 0)])
    nll = answer_nll(tiny_model, [s.turns[0][0] for s in samples], [s.image for s in samples],
                     [s.turns[0][1] for s in samples])
    for i, s in enumerate(samples):
        batch = tiny_model.processor([s.turns[0][0]], [s.image], answers=[s.turns[0][1]], padding_side="right")
        with torch.no_grad():
            mean = tiny_model(batch, logits="all").loss
        count = int((batch.labels[:, 1:] != -100).sum())
        assert float(nll[i]) == pytest.approx(float(mean) * count, rel=1e-5)


def test_identical_images_give_no_gap(tiny_model):
    out = image_reliance(tiny_model, _samples([(255, 0, 0)] * 5), batch_size=2)
    assert out["gap"] == pytest.approx(0.0, abs=1e-6)
    assert out["n"] == 5  # the last batch of one borrowed an image and was counted once


def test_a_model_blind_to_its_visual_tokens_has_no_gap(tiny_model):
    with torch.no_grad():  # every image projects to the same (zero) visual tokens
        for p in tiny_model.projector.parameters():
            p.zero_()
    out = image_reliance(tiny_model, _samples([(255, 0, 0), (0, 0, 255)] * 3), batch_size=3)
    assert out["gap"] == pytest.approx(0.0, abs=1e-5)


def test_a_model_that_learned_to_read_the_color_has_a_positive_gap(tiny_model):
    samples = _samples([(255, 0, 0), (0, 0, 255)] * 4)
    before = image_reliance(tiny_model, samples, batch_size=8)
    batch = tiny_model.processor([s.turns[0][0] for s in samples], [s.image for s in samples],
                                 answers=[s.turns[0][1] for s in samples], padding_side="right")
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3)
    tiny_model.train()
    for _ in range(40):
        loss = tiny_model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = image_reliance(tiny_model, samples, batch_size=8)
    assert after["gap"] > 2.0 > abs(before["gap"])  # the wrong color costs nats only once the model reads it
    assert after["own_nll"] < before["own_nll"]
    assert tiny_model.training  # the caller's mode is restored


def test_bad_input_is_a_typed_error(tiny_model):
    with pytest.raises(InputError, match="at least 2 samples"):
        image_reliance(tiny_model, _samples([(255, 0, 0)]))
    with pytest.raises(InputError, match="pixels"):
        image_reliance(tiny_model, [Sample(id="a", source="t", turns=[("q\n<image>", "a")])] * 2)
