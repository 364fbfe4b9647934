"""Gradient checkpointing (``model.gradient_checkpointing: true``): the same gradients as storing the activations.

The oracle is the same model's backward without checkpointing; recomputation in fp32 on the CPU is exact up to
summation order, so the gradients agree to 1e-6.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taskmllm.model.mllm import TaskMLLM
from taskmllm.training.config import load_config
from taskmllm.training.train import CLOCK_KEYS, train
from tests.conftest import tiny_config
from tests.training.helpers import RECIPE, overrides


def _grads(model: torch.nn.Module, batch, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss on the LM and the hidden states, and the elements autograd saved for backward."""
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    (out.loss + out.hidden_states.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("tower", ["open_clip", "mobilenet_v2"])
def test_llm_and_vision_tower_gradients_equal_the_run_without(tokenizer, tower):
    vision = {"kind": tower, "image_size": 64, "feature_layer": 6} if tower == "mobilenet_v2" else {}
    torch.manual_seed(0)
    model = TaskMLLM(tiny_config(tokenizer, **vision), tokenizer)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    batch = model.processor(["What color is the square?", "Segment the green star."], images,
                            answers=["The square is blue.", "Sure, <ref>the green star</ref><seg>."])
    (plain, kept), (ckpt, kept_ckpt) = _grads(model, batch, False), _grads(model, batch, True)
    assert kept_ckpt < 0.7 * kept  # checkpointing is in effect: far fewer activations stored
    assert plain.keys() == ckpt.keys()
    assert any(n.startswith("vision.") for n in plain) and any(n.startswith("llm.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_stage_with_gradient_checkpointing_trains_the_same(tmp_path):
    """One step of the joint stage (vision tower trained too) with and without the option: same logged losses and
    gradient norm, same weights."""
    common = ["--max_steps=1", "--precision=fp32", "--stage.trainable.vision=full"]
    rows = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        train(load_config(RECIPE / "joint.yaml", overrides(out, *common, f"--model.gradient_checkpointing={flag}")))
        rows.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0]))
    plain, ckpt = rows
    for key in set(plain) - set(CLOCK_KEYS):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
