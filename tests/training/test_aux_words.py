"""``stage.aux.words``: visual tokens classified against the LLM's own word vectors of their labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taskmllm.errors import ConfigError
from taskmllm.training.aux import AuxContext, AuxStates, WordLoss, WordOptions, build_aux
from taskmllm.training.config import load_config
from taskmllm.training.train import aux_context, build_joint, word_vectors
from tests.training.helpers import RECIPE, overrides


def test_word_vectors_are_the_mean_input_embedding_of_each_phrase(tmp_path):
    joint = build_joint(load_config(RECIPE / "pretrain.yaml", overrides(tmp_path)))
    mllm = joint.mllm
    table = mllm.llm.get_input_embeddings().weight
    ids = mllm.tokenizer(" red circle", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2  # the oracle averages several rows
    got = word_vectors(mllm, [" red circle", " red"])
    assert torch.allclose(got[0], table[ids].mean(0))
    assert torch.allclose(got[1], table[mllm.tokenizer(" red", add_special_tokens=False)["input_ids"]].mean(0))
    assert not got.requires_grad


def _two_token_case(**options):
    """A words loss on two tokens, one on a circle (the left half of a 4 x 4 image) and one on background."""
    from taskmllm.data.sample import ObjectGT, Sample
    from taskmllm.model.expert_inputs import ExpertInputs

    vectors = {" background": [1.0, 0, 0], " circle": [0, 2.0, 0], " square": [0, 0, 3.0]}
    context = AuxContext(3, 2, 1, {"category": ("circle", "square")},
                         word_vectors=lambda phrases: torch.tensor([vectors[p] for p in phrases]))
    loss = WordLoss(WordOptions(labels=["category"], scale=5.0, cover=0.5, **options), context)
    mask = np.zeros((4, 4), bool)
    mask[:, 0:2] = True  # the left token
    sample = Sample("s", "any", image=np.zeros((4, 4, 3), np.uint8), objects=[ObjectGT(1, "circle", mask=mask)])
    tokens = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, -1.0]])  # (N=2, H=3)
    embeds = torch.zeros(1, 4, 3)
    embeds[0, 1:3] = tokens
    visual = torch.tensor([[False, True, True, False]])
    inputs = ExpertInputs(torch.zeros(1, 2, 2), (1, 2), 4, [1], [(4, 4)], visual_grid=(1, 2))
    states = AuxStates((embeds, embeds + 1), visual, inputs, max_frames=1)  # layer 0: the LLM's inputs
    return loss, states, [sample], tokens


def test_words_loss_by_hand():
    """Cosine logits scaled by ``scale``, cross-entropy against background / circle."""
    loss, states, samples, tokens = _two_token_case()
    words = torch.eye(3)  # the three word vectors, normalized: the axes
    logits = 5.0 * F.normalize(tokens, dim=-1) @ words.T  # (2, 3): background, circle, square
    want = F.cross_entropy(logits, torch.tensor([1, 0]))
    got = loss.loss(states, samples)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)
    got.backward()
    assert loss.log_scale.grad is not None  # the scale is learned


def test_words_regress_pulls_each_token_onto_its_word():
    """``regress``: + weight x mean |token - word|^2 / |word|^2; the circle token's word is (0, 2, 0), the
    background's (1, 0, 0): (0.25 + 1) / 4 and 1 / 1, mean 0.65625."""
    plain, states, samples, _ = _two_token_case()
    pulled = _two_token_case(regress=2.0)[0]
    got = pulled.loss(states, samples) - plain.loss(states, samples)
    assert float(got) == pytest.approx(2.0 * 0.65625, rel=1e-6)


def test_words_loss_bad_settings(tmp_path):
    context = AuxContext(3, 2, 2, {"category": ("circle",)})
    with pytest.raises(ConfigError, match="word vectors"):
        WordLoss(WordOptions(labels=["category"]), context)
    context.word_vectors = lambda phrases: torch.zeros(len(phrases), 3)
    with pytest.raises(ConfigError, match=r"layer must be in 0..2"):
        WordLoss(WordOptions(layer=3, labels=["category"]), context)
    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux={words: {labels: [texture]}}"))
    with pytest.raises(ConfigError, match=r"stage.aux.words: labels \['texture'\]"):
        build_aux(cfg.stage.aux, aux_context(build_joint(cfg), cfg.data.specs()))


def test_words_loss_trains_in_a_stage(tmp_path):
    """The training loop runs it from the stage's data: a finite loss part named ``words`` that has gradients in
    the projector (layer 0 is the projector's output) and none in the LLM's embedding table."""
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.training.trainee import LossSettings, Trainee, forward_loss

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(
        tmp_path, "--stage.aux.words={labels: [category, color]}", "--stage.aux.focus.weight=0",
        "--stage.aux.attr.weight=0", "--stage.lm_weight=0"))  # the words loss alone
    joint = build_joint(cfg)
    aux = build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs()))
    data = shapesworld_dataset({"color": 1.0}, 2, seed=0, config=WorldConfig(image_size=48))
    trainee = Trainee(joint, aux, LossSettings(lm_weight=cfg.stage.lm_weight))
    loss, parts = forward_loss(trainee, [data[0], data[1]], torch.device("cpu"))
    assert torch.isfinite(parts["words"]) and float(parts["words"]) > 0
    assert float(loss) == pytest.approx(float(parts["words"]))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in joint.mllm.projector.parameters())
    table = joint.mllm.llm.get_input_embeddings().weight.grad
    assert table is None or not table.any()  # the word vectors are targets, not trained by this loss


def test_a_stage_whose_losses_read_only_the_inputs_does_not_run_the_llm(tmp_path):
    """LM weight 0, no expert, ``words`` at layer 0 (a projector warm-up): the LLM's blocks never run, and the
    loss equals the words loss on the input embeddings of a full forward (the oracle); a loss at depth > 0 runs it."""
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.training.trainee import LossSettings, Trainee, forward_loss

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(
        tmp_path, "--stage.aux={words: {labels: [category, color], regress: 1.0}}", "--stage.lm_weight=0",
        "--stage.expert_weights={seg: 0, det: 0, track: 0}"))
    joint = build_joint(cfg)
    aux = build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs()))
    trainee = Trainee(joint, aux, LossSettings(lm_weight=0.0, expert_weights=cfg.stage.expert_weights))
    assert not trainee.reads_llm
    blocks = []
    hook = joint.mllm.llm.get_decoder().layers[0].register_forward_hook(lambda *a: blocks.append(1))
    data = shapesworld_dataset({"color": 1.0, "caption": 1.0}, 3, seed=0, config=WorldConfig(image_size=48))
    loss, parts = forward_loss(trainee, list(data), torch.device("cpu"))
    assert blocks == []
    batch = joint.mllm.processor.conversations([s.turns for s in data], [s.image for s in data])
    out = joint.mllm(batch, "none")
    assert blocks  # the oracle's full forward runs the blocks
    hook.remove()
    states = AuxStates(out.layer_states, batch.input_ids == joint.mllm.image_id, out.expert_inputs, 1, batch.labels)
    assert float(loss) == pytest.approx(float(aux["words"].loss(states, list(data))), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in joint.mllm.projector.parameters())
    deeper = build_aux({"words": {"labels": ["category"], "layer": 1}}, aux_context(joint, cfg.data.specs()))
    assert Trainee(joint, deeper, LossSettings(lm_weight=0.0, expert_weights=cfg.stage.expert_weights)).reads_llm
    assert Trainee(joint, aux, LossSettings(lm_weight=1.0, expert_weights=cfg.stage.expert_weights)).reads_llm
