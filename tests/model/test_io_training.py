"""Save/load round trip and typed load errors; gradients and a one-batch overfit."""

from __future__ import annotations

import json

import pytest
import torch

from taskmllm.errors import CheckpointError
from taskmllm.model.mllm import TaskMLLM


@pytest.fixture()
def saved(tiny_model, tmp_path):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path)
    return path


def test_round_trip_bit_identical(tiny_model, saved, rgb_image):
    loaded = TaskMLLM.from_pretrained(saved)
    batch = tiny_model.processor(["Is there a red circle?", "hi"], [rgb_image, None], answers=["Yes", "no"])
    with torch.no_grad():
        assert torch.equal(tiny_model(batch).logits, loaded(batch).logits)
    assert not any(p.name.startswith(".") for p in saved.parent.iterdir())  # no temp dirs left behind


def test_save_over_existing_checkpoint(tiny_model, saved):
    tiny_model.save_pretrained(saved)
    assert (saved / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer"])
def test_missing_file_is_named(saved, name):
    target = saved / name
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=name):
        TaskMLLM.from_pretrained(saved)


def test_wrong_version_is_named(saved):
    data = json.loads((saved / "config.json").read_text())
    data["format_version"] = 0
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.json.*format_version 0"):
        TaskMLLM.from_pretrained(saved)


def test_truncated_weights_are_named(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TaskMLLM.from_pretrained(saved)


def test_lm_loss_reaches_projector_llm_and_vision(tiny_model, rgb_image):
    tiny_model.train()
    batch = tiny_model.processor(["What color is the square?"], [rgb_image], answers=["The square is blue."])
    tiny_model(batch).loss.backward()
    groups = {"projector": tiny_model.projector, "llm": tiny_model.llm, "vision": tiny_model.vision}
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum().item() for g in grads) > 0, name


def test_overfit_one_batch_below_ten_percent(overfit):
    losses = overfit[0].losses
    assert len(losses) <= 60 and min(losses[-5:]) < 0.1 * losses[0], (losses[0], losses[-5:])


def test_supervised_logits_give_the_same_loss_and_gradients(tiny_model, rgb_image):
    """``logits="supervised"`` (the LM head on answer positions only) = the full-sequence LM loss, oracle
    ``lm_loss`` over all positions; ``"none"`` runs no LM head and gives the same hidden states."""
    batch = tiny_model.processor(["Is there a red circle?", "Describe the image in detail."], [rgb_image, None],
                                 answers=["Yes", "a small picture"], padding_side="right")
    grads = []
    for mode in ("all", "supervised"):
        tiny_model.zero_grad()
        out = tiny_model(batch, logits=mode)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
        if mode == "supervised":
            assert out.logits.shape[1] < batch.input_ids.shape[1]
            torch.testing.assert_close(out.loss, full_loss)
        full_loss = out.loss.detach()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        none = tiny_model(batch, logits="none")
        assert none.loss is None and none.logits.shape[1] == 0
        torch.testing.assert_close(none.hidden_states, tiny_model(batch).hidden_states)
    tiny_model.zero_grad()
