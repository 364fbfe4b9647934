"""Tracking expert: causal memory over frames, prompt boxes, visibility-masked loss, postprocess, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import InputError, TargetError
from taskmllm.experts import ExpertPrompt, TaskTarget, TrackingOutput, VisionFeatures, build_expert, default_spec
from taskmllm.experts.temporal import causal_frame_mask

H, C, GRID, SIZE, T = 32, 24, (6, 6), 96, 5


@pytest.fixture()
def expert():
    torch.manual_seed(0)
    return build_expert("track", default_spec("track", H, C, GRID, SIZE, dim=32)).eval()


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
