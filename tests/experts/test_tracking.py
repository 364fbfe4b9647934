"""Tracking expert: causal memory over frames, prompt boxes, visibility-masked loss, postprocess, bad input;
the ``localizing`` box head (per-frame heatmap over the frame's patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import ConfigError, InputError, TargetError
from taskmllm.experts import ExpertPrompt, TaskTarget, TrackingOutput, VisionFeatures, build_expert, default_spec
from taskmllm.experts.common import LocalizingBoxHead, cell_centers
from taskmllm.experts.temporal import causal_frame_mask

H, C, GRID, SIZE, T = 32, 24, (6, 6), 96, 5
N = GRID[0] * GRID[1]


def _build(box_head: str = "mlp", **options):
    torch.manual_seed(0)
    return build_expert("track", default_spec("track", H, C, GRID, SIZE, dim=32, box_head=box_head, **options)).eval()


@pytest.fixture(params=["mlp", "localizing"])
def expert(request):
    return _build(request.param)


@pytest.fixture()
def localizing():
    return _build("localizing")


def _features(m: int, t: int = T) -> torch.Tensor:
    return torch.randn(m, t, GRID[0] * GRID[1], C)


def test_causal_mask_by_hand():
    mask = causal_frame_mask(3, 2, torch.device("cpu"))
    # token (frame 1, k) sees frames 0 and 1, not 2
    assert mask[2].tolist() == [False, False, False, False, True, True]
    assert not mask[5].any() and mask[0, 2:].all()


def test_outputs_depend_on_past_frames_only(expert):
    torch.manual_seed(1)
    q, feats = torch.randn(1, 1, H), _features(1)
    base = expert(q, VisionFeatures(feats, GRID, SIZE))
    assert base.boxes.shape == (1, T, 4) and base.visibility_logits.shape == (1, T)

    future = feats.clone()
    future[:, 3:] = torch.randn_like(future[:, 3:])
    changed = expert(q, VisionFeatures(future, GRID, SIZE))
    torch.testing.assert_close(changed.boxes[:, :3], base.boxes[:, :3])  # frames 0-2 never see frames 3+
    assert not torch.allclose(changed.boxes[:, 3:], base.boxes[:, 3:])
    if base.heat is not None:
        torch.testing.assert_close(changed.heat[:, :3], base.heat[:, :3])
        assert not torch.allclose(changed.heat[:, 3:], base.heat[:, 3:])

    past = feats.clone()
    past[:, 0] = torch.randn_like(past[:, 0])
    changed = expert(q, VisionFeatures(past, GRID, SIZE))
    assert not torch.allclose(changed.boxes[:, 4], base.boxes[:, 4])  # memory: the last frame sees frame 0


def test_prompt_box_changes_the_track_and_no_box_equals_phrase_only(expert):
    torch.manual_seed(2)
    q, feats = torch.randn(1, 1, H), VisionFeatures(_features(1), GRID, SIZE)
    none = expert(q, feats)
    phrase = expert(q, feats, [ExpertPrompt(phrase="the red circle")])
    torch.testing.assert_close(none.boxes, phrase.boxes)
    a = expert(q, feats, [ExpertPrompt(box=np.array([0.1, 0.1, 0.3, 0.3]))])
    b = expert(q, feats, [ExpertPrompt(box=torch.tensor([0.6, 0.5, 0.9, 0.9]))])
    assert not torch.allclose(a.boxes, b.boxes) and not torch.allclose(a.boxes, none.boxes)


def test_bad_prompt_box_is_an_input_error(expert):
    with pytest.raises(InputError, match="prompt 0 box"):
        expert(torch.randn(1, 1, H), VisionFeatures(_features(1), GRID, SIZE), [ExpertPrompt(box=np.zeros(3))])


def _output(boxes: np.ndarray, vis_logits: list[float]) -> TrackingOutput:
    return TrackingOutput(boxes=torch.tensor(boxes, dtype=torch.float32)[None], visibility_logits=torch.tensor([vis_logits]))


def test_loss_ignores_boxes_of_invisible_frames_and_by_hand(expert):
    truth = np.array([[0.1, 0.1, 0.5, 0.5]] * 3, dtype=np.float32)
    pred = truth.copy()
    pred[1] = [0.7, 0.7, 0.9, 0.9]  # wrong, but frame 1 is invisible
    pred[2] = [0.1, 0.1, 0.4, 0.4]  # L1 0.2, IoU = GIoU = 0.09 / 0.16
    visible = np.array([True, False, True])
    target = truth.copy()
    target[1] = np.nan  # the data engine may leave invisible rows undefined
    losses = expert.loss(_output(pred, [30.0, -30.0, 30.0]), [TaskTarget("track", boxes=target, visible=visible)])
    assert losses["track_l1"].item() == pytest.approx(5 * 0.2 / 2, rel=1e-5)
    assert losses["track_giou"].item() == pytest.approx(2 * (1 - 0.09 / 0.16) / 2, rel=1e-5)
    assert losses["track_vis"].item() == pytest.approx(0, abs=1e-6)


def test_missing_visibility_means_visible_everywhere(expert):
    truth = np.array([[0.1, 0.1, 0.5, 0.5]] * 2, dtype=np.float32)
    losses = expert.loss(_output(truth, [0.0, 0.0]), [TaskTarget("track", boxes=truth)])
    assert losses["track_l1"].item() == pytest.approx(0, abs=1e-6)
    assert losses["track_vis"].item() == pytest.approx(np.log(2), rel=1e-5)


def test_bad_targets_are_target_errors(expert):
    out = _output(np.zeros((3, 4)), [0.0] * 3)
    box3 = np.tile([[0.1, 0.1, 0.2, 0.2]], (3, 1))
    with pytest.raises(TargetError, match="for task 'det', not 'track'"):
        expert.loss(out, [TaskTarget("det", boxes=box3)])
    with pytest.raises(TargetError, match=r"\(T=3, 4\)"):
        expert.loss(out, [TaskTarget("track", boxes=box3[:2])])
    with pytest.raises(TargetError, match=r"visible must be \(T=3,\)"):
        expert.loss(out, [TaskTarget("track", boxes=box3, visible=np.ones(4, bool))])
    with pytest.raises(TargetError, match="has no boxes"):
        expert.loss(out, [TaskTarget("track", visible=np.ones(3, bool))])


def test_postprocess_pixels_and_visibility(expert):
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 1.1, 0.9]], dtype=np.float32)
    (res,) = expert.postprocess(_output(boxes, [2.0, -2.0]), [(100, 200)])
    np.testing.assert_allclose(res.boxes, [[20, 20, 60, 40], [100, 50, 200, 90]], rtol=1e-5)
    assert res.visible.tolist() == [True, False]
    np.testing.assert_allclose(res.scores, torch.sigmoid(torch.tensor([2.0, -2.0])).numpy(), rtol=1e-6)


def test_single_frame_video_works(expert):
    out = expert(torch.randn(2, 1, H), VisionFeatures(_features(2, t=1), GRID, SIZE))
    assert out.boxes.shape == (2, 1, 4)


# ------------------------------------------------------------------------------------ localizing box head
def test_localizing_outputs_heat_per_frame_and_a_finite_heat_term(localizing):
    out = localizing(torch.randn(2, 1, H), VisionFeatures(_features(2), GRID, SIZE))
    assert out.boxes.shape == (2, T, 4) and out.visibility_logits.shape == (2, T)
    assert out.heat.shape == (2, T, N) and out.grid == GRID
    assert (out.boxes[..., 2:] >= out.boxes[..., :2]).all()
    boxes = np.tile(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), (T, 1))
    losses = localizing.loss(out, [TaskTarget("track", boxes=boxes)] * 2)
    assert set(losses) == {"track_l1", "track_giou", "track_vis", "track_heat"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()) and losses["track_heat"].item() > 0


def test_mlp_head_has_no_heat():
    mlp = _build("mlp")
    out = mlp(torch.randn(1, 1, H), VisionFeatures(_features(1), GRID, SIZE))
    assert out.heat is None and out.grid is None
    assert "track_heat" not in mlp.loss(out, [TaskTarget("track", boxes=np.tile([[0.1, 0.1, 0.5, 0.5]], (T, 1)))])


def test_heat_loss_covers_visible_frames_only_and_by_hand():
    # 3 frames, frame 1 invisible (its box undefined, its heat peaked on a wrong patch); box center (0.25, 0.55)
    # on the 6 x 6 grid lies in patch 3 * 6 + 1 = 19
    expert = _build("localizing", heat_weight=0.5)
    truth = np.array([[0.1, 0.4, 0.4, 0.7]] * 3, dtype=np.float32)
    truth[1] = np.nan
    visible = np.array([True, False, True])
    heat = torch.zeros(1, 3, N)
    heat[0, 1, 0] = 30.0
    out = TrackingOutput(torch.tensor([[[0.1, 0.4, 0.4, 0.7]] * 3]), torch.zeros(1, 3), heat=heat, grid=GRID)
    target = [TaskTarget("track", boxes=truth, visible=visible)]
    assert expert.loss(out, target)["track_heat"].item() == pytest.approx(0.5 * np.log(N), rel=1e-6)
    heat[0, [0, 2], 19] = 30.0
    assert expert.loss(out, target)["track_heat"].item() < 1e-6
    none_visible = expert.loss(out, [TaskTarget("track", boxes=np.zeros((3, 4)), visible=np.zeros(3, bool))])
    assert none_visible["track_heat"].item() == 0.0


def test_localizing_box_center_is_where_the_frames_heatmap_points(localizing):
    head: LocalizingBoxHead = localizing.box_head
    with torch.no_grad():  # no offset: the center is exactly the heatmap's expected cell center
        head.mlp.layers[-1].weight.zero_()
        head.mlp.layers[-1].bias.zero_()
    out = localizing(torch.randn(2, 1, H), VisionFeatures(_features(2), GRID, SIZE))
    centers = (out.boxes[..., :2] + out.boxes[..., 2:]) / 2  # (M, T, 2)
    expected = out.heat.softmax(-1) @ cell_centers(GRID)
    torch.testing.assert_close(centers, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[..., 2:] - out.boxes[..., :2], torch.full((2, T, 2), 0.5))


def test_localizing_head_scores_each_frames_projected_patches_plus_grid_encoding(localizing):
    """Per frame, the pooled state (mean of the normed K tokens) scores ``feature_proj(frame) + PE``."""
    normed = []
    hook = localizing.norm.register_forward_hook(lambda _module, _inputs, output: normed.append(output))
    feats = _features(2)
    with torch.no_grad():
        out = localizing(torch.randn(2, 1, H), VisionFeatures(feats, GRID, SIZE))
        hook.remove()
        pooled = normed[0].mean(dim=2)  # (M, T, D)
        patches = localizing.feature_proj(feats) + localizing.pe.grid(GRID)  # (M, T, N, D)
        boxes, heat = localizing.box_head(pooled[:, :, None], patches, GRID)
    torch.testing.assert_close(out.heat, heat[:, :, 0])
    torch.testing.assert_close(out.boxes, boxes[:, :, 0])


def test_unknown_box_head_is_a_config_error():
    with pytest.raises(ConfigError, match=r"TrackingOptions.box_head must be one of \('mlp', 'localizing'\)"):
        build_expert("track", default_spec("track", H, C, GRID, SIZE, box_head="conv"))


def test_localizing_without_calls_gives_zero_terms_with_heat(localizing):
    queries = torch.randn(0, 1, H, requires_grad=True)
    out = localizing(queries, VisionFeatures(torch.randn(0, T, N, C), GRID, SIZE))
    assert out.heat.shape == (0, T, N)
    losses = localizing.loss(out, [])
    assert set(losses) == {"track_l1", "track_giou", "track_vis", "track_heat"}
    assert all(v.item() == 0.0 and v.requires_grad for v in losses.values())
    assert localizing.postprocess(out, []) == []


def test_localizing_heat_term_reaches_the_query_states_and_the_box_head(localizing):
    localizing.train()
    queries = torch.randn(2, 1, H, requires_grad=True)
    out = localizing(queries, VisionFeatures(_features(2), GRID, SIZE))
    boxes = np.tile(np.array([[0.6, 0.1, 0.9, 0.3]], np.float32), (T, 1))
    heat = localizing.loss(out, [TaskTarget("track", boxes=boxes)] * 2)["track_heat"]
    heat.backward()
    assert (queries.grad.abs().sum(-1) > 0).all()
    assert localizing.box_head.q.weight.grad.abs().sum() > 0 and localizing.box_head.k.weight.grad.abs().sum() > 0
