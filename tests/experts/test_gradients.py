"""Differentiability: each expert's loss alone reaches the query states, the vision features and every parameter
(each expert with its default options and, for det and track, with the ``localizing`` box head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.experts import EXPERTS, ExpertPrompt, TaskTarget, VisionFeatures, build_expert, default_spec

H, C, GRID, SIZE, M, T = 48, 40, (6, 6), 96, 3, 4
CONFIGS = [(name, {}) for name in sorted(EXPERTS)] + [(name, {"box_head": "localizing"}) for name in ("det", "track")]
IDS = [name + ("-" + "-".join(map(str, opts.values())) if opts else "") for name, opts in CONFIGS]


def _targets(name: str) -> tuple[list[TaskTarget], int, list[ExpertPrompt] | None]:
    rng = np.random.default_rng(0)
    if name == "seg":
        masks = [np.zeros((SIZE, SIZE), bool) for _ in range(M)]
        for i, mask in enumerate(masks):
            mask[10 + 5 * i : 50, 20 : 70 - 5 * i] = True
        return [TaskTarget("seg", mask=m) for m in masks], 1, None
    if name == "det":
        boxes = [np.array([[0.1, 0.1, 0.4, 0.5]]), np.array([[0.2, 0.3, 0.6, 0.9], [0.5, 0.1, 0.9, 0.3]]), np.zeros((0, 4))]
        return [TaskTarget("det", boxes=b) for b in boxes], 1, None
    xy = rng.uniform(0, 0.5, size=(M, T, 2))
    boxes = np.concatenate([xy, xy + 0.3], axis=-1).astype(np.float32)
    visible = np.ones((M, T), bool)
    visible[0, 2] = False
    targets = [TaskTarget("track", boxes=boxes[i], visible=visible[i]) for i in range(M)]
    prompts = [ExpertPrompt(box=boxes[0, 0]), ExpertPrompt(phrase="the red circle"), ExpertPrompt()]
    return targets, T, prompts


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_loss_alone_gives_gradients_everywhere(name, options):
    torch.manual_seed(0)
    expert = build_expert(name, default_spec(name, H, C, GRID, SIZE, dim=32, **options))
    targets, frames, prompts = _targets(name)
    queries = torch.randn(M, expert.num_queries, H, requires_grad=True)
    features = torch.randn(M, frames, GRID[0] * GRID[1], C, requires_grad=True)
    outputs = expert(queries, VisionFeatures(features, GRID, SIZE), prompts)
    losses = expert.loss(outputs, targets)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    assert queries.grad is not None and (queries.grad.abs().sum(-1) > 0).all(), "every query state gets gradient"
    assert features.grad is not None and (features.grad.abs().sum(dim=(2, 3)) > 0).all(), "every frame gets gradient"
    no_grad = [n for n, p in expert.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(p.requires_grad for p in expert.parameters())


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_each_loss_term_is_named_and_differentiable(name, options):
    torch.manual_seed(0)
    expert = build_expert(name, default_spec(name, H, C, GRID, SIZE, dim=32, **options))
    targets, frames, prompts = _targets(name)
    queries = torch.randn(M, expert.num_queries, H, requires_grad=True)
    features = VisionFeatures(torch.randn(M, frames, GRID[0] * GRID[1], C), GRID, SIZE)
    losses = expert.loss(expert(queries, features, prompts), targets)
    expected = {"seg": {"seg_bce", "seg_dice", "seg_iou"}, "det": {"det_l1", "det_giou", "det_obj"},
                "track": {"track_l1", "track_giou", "track_vis"}}[name]
    if options.get("box_head") == "localizing":
        expected = expected | {f"{name}_heat"}
    assert set(losses) == expected
    for key, value in losses.items():
        (grad,) = torch.autograd.grad(value, queries, retain_graph=True)
        assert grad.abs().sum() > 0, f"{key} does not reach the query states"


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_a_batch_without_calls_gives_zero_terms(name, options):
    expert = build_expert(name, default_spec(name, H, C, GRID, SIZE, dim=32, **options))
    queries = torch.randn(0, expert.num_queries, H, requires_grad=True)
    frames = T if name == "track" else 1
    outputs = expert(queries, VisionFeatures(torch.randn(0, frames, GRID[0] * GRID[1], C), GRID, SIZE))
    losses = expert.loss(outputs, [])
    assert len(losses) == (4 if options else 3) and all(v.item() == 0.0 and v.requires_grad for v in losses.values())
    assert expert.postprocess(outputs, []) == []


CTX_GRID, CTX = (3, 3), 24  # the LLM's pooled token grid and hidden width (2 x 2 pooling of the 6 x 6 patches)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_llm_context_reaches_the_expert_and_gets_gradient(name):
    """With ``llm_context`` each expert reads the LLM's visual-token states: they change its outputs, gradients
    reach them, and an expert built with it refuses a call without them (typed error)."""
    from taskmllm.errors import InputError

    torch.manual_seed(0)
    expert = build_expert(name, default_spec(name, CTX, C, GRID, SIZE, dim=32, llm_context=True))
    targets, frames, prompts = _targets(name)
    queries = torch.randn(M, expert.num_queries, CTX)
    features = torch.randn(M, frames, GRID[0] * GRID[1], C)
    context = torch.randn(M, frames, CTX_GRID[0] * CTX_GRID[1], CTX, requires_grad=True)
    outputs = expert(queries, VisionFeatures(features, GRID, SIZE, context, CTX_GRID), prompts)
    sum(expert.loss(outputs, targets).values()).backward()
    assert context.grad is not None and (context.grad.abs().sum(dim=(2, 3)) > 0).all()
    other = expert(queries, VisionFeatures(features, GRID, SIZE, torch.zeros_like(context), CTX_GRID), prompts)
    first = outputs.mask_logits if name == "seg" else outputs.boxes
    assert not torch.allclose(first, other.mask_logits if name == "seg" else other.boxes)
    with pytest.raises(InputError, match="llm_context"):
        expert(queries, VisionFeatures(features, GRID, SIZE), prompts)


def test_feature_projection_spreads_each_llm_token_over_the_patches_it_pools():
    """Hand-computed: ``LayerNorm(proj(x) + ctx(c))`` with each of the 3 x 3 tokens copied onto its 2 x 2 patches."""
    from taskmllm.experts.common import FeatureProjection

    torch.manual_seed(0)
    fp = FeatureProjection(C, 32, CTX)
    x = torch.randn(2, GRID[0] * GRID[1], C)
    c = torch.randn(2, CTX_GRID[0] * CTX_GRID[1], CTX)
    spread = fp.context(c).reshape(2, 3, 3, 32).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 36, 32)
    want = torch.nn.functional.layer_norm(fp.proj(x) + spread, (32,), fp.norm.weight, fp.norm.bias, fp.norm.eps)
    torch.testing.assert_close(fp(x, GRID, c, CTX_GRID), want)
    torch.testing.assert_close(FeatureProjection(C, 32)(x).shape, want.shape)
