"""``stage.aux.lookup``: the answer position's state queries the visual tokens for what the question names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taskmllm.data.sample import Grounding, ObjectGT, Sample
from taskmllm.errors import ConfigError
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.training.aux import AuxContext, AuxStates, LookupLoss, LookupOptions, build_aux
from taskmllm.training.config import load_config
from taskmllm.training.train import aux_context, build_joint
from tests.training.helpers import RECIPE, overrides


def test_answer_positions_are_the_tokens_before_each_first_answer():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100, 9],
                           [-100, 5, 6, -100, -100, -100, -100],
                           [-100] * 7])
    states = AuxStates((torch.zeros(3, 7, 2),), torch.zeros(3, 7, dtype=torch.bool), None, 1, labels)
    assert states.answer_positions().tolist() == [2, 0, -1]
    assert AuxStates((torch.zeros(2, 7, 2),), torch.zeros(2, 7, dtype=torch.bool), None, 1
                     ).answer_positions().tolist() == [-1, -1]


def _case(named: tuple[int, ...]):
    """One image-first sample: 2 visual tokens (positions 1-2; the left one shows object 1), the question at
    positions 3-4, its answer from position 5: the state at position 4 asks."""
    context = AuxContext(hidden_size=3, vision_width=2, num_layers=1)
    loss = LookupLoss(LookupOptions(layer=1, dim=2, pos_weight=4.0), context)
    mask = np.zeros((4, 4), bool)
    mask[:, 0:2] = True
    sample = Sample("s", "any", image=np.zeros((4, 4, 3), np.uint8), objects=[ObjectGT(1, "circle", mask=mask)],
                    grounding=Grounding("Is there a circle?", named))
    hidden = torch.zeros(1, 7, 3)
    hidden[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # the token on the circle
    hidden[0, 2] = torch.tensor([0.0, 1.0, 0.0])  # background
    hidden[0, 4] = torch.tensor([0.0, 0.0, 2.0])  # the answer position
    visual = torch.tensor([[False, True, True, False, False, False, False]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 11, 12]])
    inputs = ExpertInputs(torch.zeros(1, 2, 2), (1, 2), 4, [1], [(4, 4)], visual_grid=(1, 2))
    states = AuxStates((hidden, hidden), visual, inputs, max_frames=1, labels=labels)
    with torch.no_grad():  # query = the answer state's last coordinate on both axes, keys = the tokens' first two
        loss.query.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
        loss.query.bias.zero_()
        loss.key.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
        loss.key.bias.zero_()
    return loss, states, [sample]


def _bce(logit: float, target: float, pos_weight: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


@pytest.mark.parametrize("named, targets", [((1,), (1.0, 0.0)), ((), (0.0, 0.0))])
def test_lookup_loss_by_hand(named, targets):
    """q = (2, 2); keys (1, 0) and (0, -1): logits 2/√2 - 2 and -2/√2 - 2 (bias -2), BCE against the cover (the
    circle fills the left token; a question naming nothing present has no positive token), mean of the two."""
    loss, states, samples = _case(named)
    logits = (2 / math.sqrt(2) - 2.0, -2 / math.sqrt(2) - 2.0)
    want = sum(_bce(z, t, 4.0) for z, t in zip(logits, targets)) / 2
    got = loss.loss(states, samples)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    assert loss.query.weight.grad.abs().sum() > 0 and loss.key.weight.grad.abs().sum() > 0


def test_lookup_loss_is_zero_without_an_answer_or_grounding():
    loss, states, samples = _case((1,))
    states.labels = torch.full_like(states.labels, -100)
    assert float(loss.loss(states, samples).detach()) == 0.0
    loss, states, samples = _case((1,))
    samples[0].grounding = None
    assert float(loss.loss(states, samples).detach()) == 0.0


def test_lookup_trains_in_an_image_first_stage(tmp_path):
    """Built from ``stage.aux`` where ``focus`` cannot be (the image first): a finite loss part ``lookup`` whose
    gradient reaches the LLM; a bad layer is named."""
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.training.trainee import LossSettings, Trainee, forward_loss

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(
        tmp_path, "--model.image_first=true", "--stage.aux={lookup: {layer: 1}}", "--stage.lm_weight=0",
        "--stage.trainable={projector: full, llm: full}"))
    joint = build_joint(cfg)
    aux = build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs()))
    assert list(aux) == ["lookup"]
    data = shapesworld_dataset({"exist": 1.0}, 4, seed=0, config=WorldConfig(image_size=48))
    loss, parts = forward_loss(Trainee(joint, aux, LossSettings(lm_weight=0.0)), list(data), torch.device("cpu"))
    assert torch.isfinite(parts["lookup"]) and float(parts["lookup"]) > 0
    loss.backward()
    block = joint.mllm.llm.get_decoder().layers[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    with pytest.raises(ConfigError, match=r"stage.aux.lookup: layer must be in 1\.\.1 "):
        build_aux({"lookup": {"layer": 9}}, aux_context(joint, cfg.data.specs()))


def test_each_frame_knows_its_sample():
    """A 2-frame video, a text-only sample, an image: the lookup reads frame f's question at row 0, 0, 2."""
    inputs = ExpertInputs(torch.zeros(3, 4, 2), (2, 2), 8, [2, 0, 1], [(8, 8), None, (8, 8)])
    assert inputs.frame_samples().tolist() == [0, 0, 2]
