"""FULLER's gradient calibration (``stage.grad_calibration: fuller``) against hand-computed cases, and on the real
trainee: the gradient reaching the LLM's last hidden states is exactly the calibrated one, the heads keep their own
gradients, the visual and text sides of the input embeddings leave balanced; ``none`` is today's training."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from taskmllm.errors import ConfigError
from taskmllm.training.config import load_config
from taskmllm.training.grad_calibration import (balance_magnitudes, balance_modalities, calibrate, calibrated_loss,
                                                project_conflicts)
from taskmllm.training.train import train
from tests.training.helpers import RECIPE, overrides


def test_opposite_gradients_cancel_exactly():
    g = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    assert torch.equal(project_conflicts(g), torch.zeros(2, 2))
    assert torch.equal(calibrate(g), torch.zeros(2))


def test_the_projection_removes_the_conflicting_component_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1·g2 = -1: a conflict
    p = project_conflicts(g)
    # g1 - (g1·g2 / |g2|²) g2 = (1, 0) + ½ (-1, 1); g2 - (g2·g1 / |g1|²) g1 = (-1, 1) + (1, 0)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert float(p[0] @ g[1]) == pytest.approx(0.0) and float(p[1] @ g[0]) == pytest.approx(0.0)


def test_gradients_without_conflict_keep_their_direction():
    g = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert torch.equal(project_conflicts(g), g)


def test_magnitudes_are_balanced_to_the_mean_norm():
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # norms 5, 1, 0: the zero task takes no part
    b = balance_magnitudes(g, g)
    assert b.norm(dim=1).tolist() == pytest.approx([3.0, 3.0, 0.0])
    assert torch.allclose(b[0], g[0] * 3 / 5) and torch.allclose(b[1], g[1] * 3)
    # the hand case above: projected norms √½ and 1, balanced to the originals' mean (1 + √2) / 2, summed
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    m = (1 + math.sqrt(2)) / 2
    want = torch.tensor([0.5, 0.5]) / math.sqrt(0.5) * m + torch.tensor([0.0, 1.0]) * m
    assert torch.allclose(calibrate(g), want)


def test_modalities_are_balanced_by_hand():
    grad = torch.zeros(1, 3, 2)
    grad[0, 0] = torch.tensor([3.0, 4.0])  # visual, norm 5
    grad[0, 1] = torch.tensor([1.0, 0.0])  # text, norm 1
    visual = torch.tensor([[True, False, False]])
    out = balance_modalities(grad, visual)
    assert out[0, 0].norm() == pytest.approx(3.0) and out[0, 1].norm() == pytest.approx(3.0)
    assert torch.allclose(out[0, 0], grad[0, 0] * 3 / 5) and torch.equal(out[0, 2], torch.zeros(2))
    assert torch.equal(balance_modalities(grad, torch.zeros(1, 3, dtype=torch.bool)), grad)  # one side: as is


def test_calibrated_loss_sends_the_calibrated_gradient_through_the_shared_tensor_by_hand():
    """h = w ⊙ x; task 1 = a·h + 3θ (θ its own head parameter), task 2 = b·h with b conflicting with a. The
    shared parameter w gets x ⊙ calibrate([a, b]); θ gets its own 3; the value is the plain total."""
    x = torch.tensor([1.0, 2.0])
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    theta = torch.tensor(0.5, requires_grad=True)
    h = w * x
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    t1, t2 = (h * a).sum() + 3 * theta, (h * b).sum()
    total = t1 + t2
    loss, norms = calibrated_loss(total, {"one": t1, "two": t2}, [h])
    assert float(loss.detach()) == pytest.approx(float(total.detach()))
    loss.backward()
    assert torch.allclose(w.grad, x * calibrate(torch.stack([a, b])))
    assert float(theta.grad) == pytest.approx(3.0)
    assert float(norms["gradnorm_one"]) == pytest.approx(1.0) and float(norms["gradnorm_two"]) == pytest.approx(2 ** .5)


# ------------------------------------------------------------------------------------------ the trainee
def _trainee(tmp_path, calibration: str):
    """The tiny joint stage's trainee (every expert, the focus and attr losses, context not detached) and one
    micro-batch of image questions (one forward)."""
    from taskmllm.training.data_loader import Collate
    from taskmllm.training.train import build_dataset, build_trainee

    cfg = load_config(RECIPE / "joint.yaml", overrides(tmp_path, "--stage.lora.dropout=0.0",
                                                       "--stage.detach_context=[]",
                                                       f"--stage.grad_calibration={calibration}"))
    torch.manual_seed(0)
    trainee, _ = build_trainee(cfg, cfg.data.specs(), torch.device("cpu"))
    data = build_dataset(cfg)
    images = [s for s in (data[i] for i in range(200)) if s.image is not None and s.frames is None]
    samples = [next(s for s in images if [t.task for t in s.targets] == [task]) for task in ("seg", "det")]
    samples += [s for s in images if not s.targets][:2]  # and two plain answers
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    assert len(micro.groups) == 1
    return trainee, micro


def _forward_keeping_runs(trainee, micro):
    """``trainee(micro)`` with each forward's record kept: a test-side wrapper of the instance's ``_group``."""
    runs, inner = [], trainee._group

    def group(g):
        run = inner(g)
        runs.append(run)
        return run

    trainee._group = group
    loss, parts = trainee(micro)
    return loss, parts, runs


def test_the_hidden_states_get_exactly_the_calibrated_gradient(tmp_path):
    """The gradient at the LLM's last hidden states is the calibration of the tasks' gradients there (one
    autograd.grad per task, here); the logged value is the plain total; the LLM's weights get another gradient
    than without calibration, the experts (which the hidden states do not reach) the same."""
    from taskmllm.training.trainee import task_losses

    trainee, micro = _trainee(tmp_path / "f", "fuller")
    plain, _ = _trainee(tmp_path / "n", "none")
    plain.load_state_dict(trainee.state_dict())
    loss, parts, runs = _forward_keeping_runs(trainee, micro)
    run = runs[0]
    tasks = task_losses(run["lm"], run["experts"], list(trainee.joint.experts), trainee.settings, run["extra"])
    assert set(tasks) == {"lm", "seg", "det", "aux_focus", "aux_attr"}  # track: no call, no term
    grads = torch.stack([torch.autograd.grad(v, run["hidden"], retain_graph=True, allow_unused=True,
                                             materialize_grads=True)[0].reshape(-1) for v in tasks.values()])
    names = list(tasks)
    assert all(grads[names.index(t)].norm() > 0 for t in ("lm", "seg", "det"))  # they all reach the last states
    assert float(loss.detach()) == pytest.approx(float(parts["total"]), rel=1e-6)
    assert float(parts["gradnorm_lm"]) == pytest.approx(float(grads[0].norm()), rel=1e-5)
    seen = []
    run["hidden"].register_hook(seen.append)  # after every autograd.grad: sees the engine's backward only
    loss.backward()
    assert torch.allclose(seen[0].reshape(-1), calibrate(grads), atol=1e-7)
    ref_loss, _ = plain(micro)
    assert float(ref_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)  # same weights, same batch
    ref_loss.backward()
    mine = dict(trainee.named_parameters())
    for name, p in plain.joint.experts.named_parameters():
        if p.grad is not None:
            assert torch.allclose(mine[f"joint.experts.{name}"].grad, p.grad, atol=1e-6), name
    differ = [n for n, p in plain.joint.mllm.llm.named_parameters()
              if p.grad is not None and not torch.allclose(mine[f"joint.mllm.llm.{n}"].grad, p.grad, atol=1e-6)]
    assert differ, "the calibration changed nothing in the LLM"


def test_the_visual_and_text_sides_leave_balanced(tmp_path):
    """The gradient leaving the LLM's input embeddings has equal norms on the visual-token positions and on the
    others under ``fuller`` (read by a hook registered after the calibration's, which receives its output);
    without calibration the two differ."""
    def norms(calibration: str) -> tuple[float, float]:
        trainee, micro = _trainee(tmp_path / calibration, calibration)
        loss, _, runs = _forward_keeping_runs(trainee, micro)
        seen = []
        runs[0]["embeddings"].register_hook(seen.append)
        loss.backward()
        visual = (micro.groups[0].batch.input_ids == trainee.joint.mllm.image_id).unsqueeze(-1)
        return float((seen[0] * visual).norm()), float((seen[0] * ~visual).norm())

    v, t = norms("fuller")
    assert v == pytest.approx(t, rel=1e-5) and v > 0
    v0, t0 = norms("none")
    assert abs(v0 - t0) > 0.05 * max(v0, t0)


def test_none_is_todays_training_and_fuller_trains_otherwise(tmp_path):
    """Two joint steps: an explicit ``none`` gives bit-identical weights to the stage without the option;
    ``fuller`` trains (finite, different weights)."""
    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        train(load_config(RECIPE / "joint.yaml", overrides(out, "--max_steps=2", "--stage.lora.dropout=0.0",
                                                           "--precision=fp32", *extra)))
        return load_file(str(out / "final" / "model.safetensors"))

    base, none, fuller = run("base"), run("none", "--stage.grad_calibration=none"), \
        run("fuller", "--stage.grad_calibration=fuller")
    assert base.keys() == none.keys() and all(torch.equal(base[k], none[k]) for k in base)
    assert all(torch.isfinite(v).all() for v in fuller.values())
    assert any(not torch.equal(base[k], fuller[k]) for k in base)


def test_an_unknown_calibration_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="grad_calibration"):
        load_config(RECIPE / "joint.yaml", overrides(tmp_path, "--stage.grad_calibration=pcgrad"))
