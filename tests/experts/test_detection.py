"""Detection expert: set loss is permutation invariant and zero for a perfect set; postprocess; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.errors import ConfigError, TargetError
from taskmllm.experts import DetectionOutput, TaskTarget, VisionFeatures, build_expert, default_spec
from taskmllm.experts.common import LocalizingBoxHead, cell_centers, heatmap_loss

H, C, GRID, SIZE, K = 32, 24, (6, 6), 96, 4
TARGET = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.8]], dtype=np.float32)


@pytest.fixture(params=["mlp", "localizing"])
def expert(request):
    torch.manual_seed(0)
    return build_expert("det", default_spec("det", H, C, GRID, SIZE, num_queries=K, dim=32, box_head=request.param))


def _features(m: int) -> VisionFeatures:
    return VisionFeatures(torch.randn(m, 1, GRID[0] * GRID[1], C), GRID, SIZE)


def test_outputs_are_valid_normalized_boxes(expert):
    out = expert(torch.randn(2, K, H), _features(2))
    assert out.boxes.shape == (2, K, 4) and out.logits.shape == (2, K)
    if expert.options.box_head == "localizing":
        assert out.heat.shape == (2, K, GRID[0] * GRID[1]) and out.grid == GRID
        assert set(expert.loss(out, [TaskTarget("det", boxes=TARGET)] * 2)) == {"det_l1", "det_giou", "det_obj",
                                                                                 "det_heat"}
    assert (out.boxes[..., 2:] >= out.boxes[..., :2]).all()
    assert out.boxes[..., 0].min() > -0.5 and out.boxes[..., 2].max() < 1.5  # cx, w in (0, 1)


def _perfect(order: list[int]) -> DetectionOutput:
    boxes = torch.tensor([[0.3, 0.3, 0.6, 0.6]] * K)
    logits = torch.full((K,), -20.0)
    for slot, j in zip(order, range(len(TARGET))):
        boxes[slot] = torch.from_numpy(TARGET[j])
        logits[slot] = 20.0
    return DetectionOutput(boxes=boxes[None], logits=logits[None])


@pytest.mark.parametrize("order", [[0, 1], [3, 1], [2, 0]])
def test_perfect_set_in_any_slot_order_has_zero_loss(expert, order):
    losses = expert.loss(_perfect(order), [TaskTarget("det", boxes=TARGET)])
    assert losses["det_l1"].item() == pytest.approx(0, abs=1e-6)
    assert losses["det_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["det_obj"].item() == pytest.approx(0, abs=1e-6)


def test_loss_values_by_hand(expert):
    # one target, every slot at one box: L1 = 0.1 + 0.1 = 0.2 (x2, y2 off by 0.1), IoU = GIoU = 0.09 / 0.16
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.4]] * K])
    out = DetectionOutput(boxes=boxes, logits=torch.zeros(1, K))
    losses = expert.loss(out, [TaskTarget("det", boxes=np.array([[0.1, 0.1, 0.5, 0.5]]))])
    assert losses["det_l1"].item() == pytest.approx(5 * 0.2, rel=1e-5)
    assert losses["det_giou"].item() == pytest.approx(2 * (1 - 0.09 / 0.16), rel=1e-5)
    assert losses["det_obj"].item() == pytest.approx(np.log(2), rel=1e-5)


def test_loss_is_invariant_to_target_order(expert):
    out = expert(torch.randn(1, K, H), _features(1))
    a = expert.loss(out, [TaskTarget("det", boxes=TARGET)])
    b = expert.loss(out, [TaskTarget("det", boxes=TARGET[::-1].copy())])
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6)


def test_empty_target_only_trains_objectness(expert):
    out = expert(torch.randn(1, K, H), _features(1))
    losses = expert.loss(out, [TaskTarget("det", boxes=np.zeros((0, 4)))])
    assert losses["det_l1"].item() == 0 and losses["det_giou"].item() == 0
    expected = torch.nn.functional.softplus(out.logits).mean().item()  # BCE with all-zero labels
    assert losses["det_obj"].item() == pytest.approx(expected, rel=1e-5)


def test_postprocess_thresholds_sorts_and_scales(expert):
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 1.2, 0.9], [0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]]])
    logits = torch.tensor([[0.5, 3.0, -1.0, 1.0]])
    (res,) = expert.postprocess(DetectionOutput(boxes, logits), [(100, 200)])
    np.testing.assert_allclose(res.scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])).numpy(), rtol=1e-6)
    np.testing.assert_allclose(res.boxes, [[100, 50, 200, 90], [40, 20, 60, 30], [20, 20, 60, 40]], rtol=1e-5)
    (low,) = expert.postprocess(DetectionOutput(boxes, logits), [(100, 200)], score_threshold=0.0)
    assert len(low.boxes) == 4


def test_postprocess_nms_drops_duplicates_of_a_better_box():
    """Slots 0 and 1 are the same box up to IoU 0.81 (90 x 90 inside 100 x 100); with ``nms_iou`` 0.5 only the
    higher-scoring one stays, the disjoint slot 2 too; ``nms_iou`` 0 keeps all; a bad value is a ConfigError."""
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.05, 0.05, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]])
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    spec = default_spec("det", H, C, GRID, SIZE, num_queries=3, dim=32, nms_iou=0.5)
    (res,) = build_expert("det", spec).postprocess(DetectionOutput(boxes, logits), [(100, 100)], score_threshold=0.0)
    np.testing.assert_allclose(res.boxes, [[5, 5, 50, 50], [60, 60, 90, 90]], rtol=1e-5)
    spec = default_spec("det", H, C, GRID, SIZE, num_queries=3, dim=32)
    (every,) = build_expert("det", spec).postprocess(DetectionOutput(boxes, logits), [(100, 100)], score_threshold=0.0)
    assert len(every.boxes) == 3
    with pytest.raises(ConfigError, match="nms_iou"):
        build_expert("det", default_spec("det", H, C, GRID, SIZE, dim=32, nms_iou=1.5))


def test_bad_targets_are_target_errors(expert):
    out = expert(torch.randn(1, K, H), _features(1))
    with pytest.raises(TargetError, match="for task 'seg', not 'det'"):
        expert.loss(out, [TaskTarget("seg", mask=np.ones((4, 4), bool))])
    with pytest.raises(TargetError, match="has no boxes"):
        expert.loss(out, [TaskTarget("det")])
    with pytest.raises(TargetError, match=r"\(n, 4\)"):
        expert.loss(out, [TaskTarget("det", boxes=np.ones((2, 5)))])
    with pytest.raises(TargetError, match="5 boxes but the expert predicts at most 4"):
        expert.loss(out, [TaskTarget("det", boxes=np.tile([[0.1, 0.1, 0.2, 0.2]], (5, 1)))])
    with pytest.raises(TargetError, match="x2 >= x1"):
        expert.loss(out, [TaskTarget("det", boxes=np.array([[0.5, 0.1, 0.2, 0.2]]))])
    with pytest.raises(TargetError, match="needs a DetectionOutput"):
        expert.loss(object(), [TaskTarget("det", boxes=TARGET)])


def test_video_features_are_rejected(expert):
    with pytest.raises(ConfigError, match="T=1"):
        expert(torch.randn(1, K, H), VisionFeatures(torch.randn(1, 3, 36, C), GRID, SIZE))


def test_unknown_box_head_is_a_config_error():
    with pytest.raises(ConfigError, match="box_head must be one of"):
        build_expert("det", default_spec("det", H, C, GRID, SIZE, box_head="conv"))


def test_cell_centers_by_hand():
    np.testing.assert_allclose(cell_centers((2, 3)).numpy(),
                               [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]])


def test_heatmap_loss_targets_the_cell_of_the_box_center():
    # center (0.25, 0.55) on a 6 x 6 grid: column int(1.5) = 1, row int(3.3) = 3 -> patch 3 * 6 + 1 = 19
    box = torch.tensor([[0.1, 0.4, 0.4, 0.7]])
    uniform = torch.zeros(1, 36)
    assert heatmap_loss(uniform, box, (6, 6)).item() == pytest.approx(np.log(36), rel=1e-6)
    peaked = torch.zeros(1, 36)
    peaked[0, 19] = 30.0
    assert heatmap_loss(peaked, box, (6, 6)).item() < 1e-6
    assert heatmap_loss(torch.zeros(0, 36), torch.zeros(0, 4), (6, 6)).item() == 0.0


def test_localizing_head_centers_the_box_on_the_patch_it_looks_at():
    d, grid = 8, (2, 3)
    head = LocalizingBoxHead(d)
    with torch.no_grad():
        for lin in (head.q, head.k):
            lin.weight.copy_(torch.eye(d) * 10)
            lin.bias.zero_()
        head.mlp.layers[-1].weight.zero_()
        head.mlp.layers[-1].bias.zero_()  # no offset, w = h = sigmoid(0) = 0.5
    patches = torch.eye(d)[:6][None]  # patch j is the unit vector e_j
    tokens = torch.eye(d)[[4, 0]][None]  # token 0 looks at patch 4, token 1 at patch 0
    boxes, heat = head(tokens, patches, grid)
    assert heat.shape == (1, 2, 6) and heat[0].argmax(-1).tolist() == [4, 0]
    centers = (boxes[0, :, :2] + boxes[0, :, 2:]) / 2
    np.testing.assert_allclose(centers.detach().numpy(), [[0.5, 0.75], [1 / 6, 0.25]], atol=1e-4)
    np.testing.assert_allclose((boxes[0, :, 2:] - boxes[0, :, :2]).detach().numpy(), 0.5, atol=1e-6)


def _center_expert():
    torch.manual_seed(0)
    return build_expert("det", default_spec("det", H, C, GRID, SIZE, num_queries=K, dim=32, box_head="localizing",
                                            score_head="center"))


def test_center_targets_mark_the_cells_of_every_box_center():
    from taskmllm.experts.detection import center_targets

    # TARGET centers (0.25, 0.3) and (0.7, 0.5) on 6 x 6: cells 1 * 6 + 1 = 7 and 3 * 6 + 4 = 22
    t = center_targets([torch.from_numpy(TARGET), torch.zeros(0, 4)], GRID)
    assert t.shape == (2, 36) and t[0].nonzero().flatten().tolist() == [7, 22] and t[1].sum() == 0


def test_center_score_is_objectness_plus_the_center_map_under_the_heatmap():
    expert = _center_expert()
    q, f = torch.randn(2, K, H), _features(2)
    with torch.no_grad():
        out = expert(q, f)
        expert.center_head = None  # the same forward without the center map: objectness alone
        slot_only = expert(q, f)
    assert out.center.shape == (2, 36)
    expected = slot_only.logits + (out.heat.softmax(-1) * out.center[:, None]).sum(-1)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.boxes, slot_only.boxes)


def test_center_loss_is_retinanets_focal_loss_per_target():
    expert = _center_expert()
    out = expert(torch.randn(2, K, H), _features(2))
    targets = [TaskTarget("det", boxes=TARGET), TaskTarget("det", boxes=np.zeros((0, 4), np.float32))]
    losses = expert.loss(out, targets)
    # RetinaNet (Lin et al. 2017), alpha 0.25, gamma 2, summed over cells, divided by the 2 target centers
    x = out.center.detach().double()
    y = torch.zeros(2, 36, dtype=torch.double)
    y[0, [7, 22]] = 1
    p = x.sigmoid()
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    focal = -(alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum() / 2
    assert losses["det_center"].item() == pytest.approx(focal.item(), rel=1e-5)
    losses["det_center"].backward()
    assert expert.center_head.weight.grad.abs().sum() > 0


def test_center_score_head_needs_the_localizing_box_head():
    with pytest.raises(ConfigError, match="needs box_head='localizing'"):
        build_expert("det", default_spec("det", H, C, GRID, SIZE, score_head="center"))
    with pytest.raises(ConfigError, match="score_head must be one of"):
        build_expert("det", default_spec("det", H, C, GRID, SIZE, box_head="localizing", score_head="peak"))


def test_match_center_map_is_the_patches_dot_the_mean_projected_query():
    from taskmllm.experts.detection import MatchCenterHead

    torch.manual_seed(0)
    expert = build_expert("det", default_spec("det", H, C, GRID, SIZE, num_queries=K, dim=32, box_head="localizing",
                                              score_head="match"))
    assert isinstance(expert.center_head, MatchCenterHead)
    assert expert.center_head.bias.item() == pytest.approx(-np.log(99.0))  # RetinaNet's prior, as `center`
    head = expert.center_head
    patches, queries = torch.randn(2, 36, 32), torch.randn(2, K, 32)
    by_hand = torch.einsum("mnd,md->mn", patches, head.proj(queries.mean(1))) / np.sqrt(32) + head.bias
    torch.testing.assert_close(head(patches, queries), by_hand)
    # the map depends on the query (a `center` map reads the patches only): the same image, two phrases
    f = _features(1).features.expand(2, -1, -1, -1)
    with torch.no_grad():
        out = expert(torch.randn(2, K, H), VisionFeatures(f, GRID, SIZE))
    assert out.center.shape == (2, 36) and not torch.allclose(out.center[0], out.center[1], atol=1e-3)
    losses = expert.loss(expert(torch.randn(2, K, H), _features(2)),
                         [TaskTarget("det", boxes=TARGET), TaskTarget("det", boxes=np.zeros((0, 4), np.float32))])
    losses["det_center"].backward()
    assert head.proj.weight.grad.abs().sum() > 0 and expert.query_proj.net[0].weight.grad.abs().sum() > 0


def test_match_score_head_needs_the_localizing_box_head():
    with pytest.raises(ConfigError, match="needs box_head='localizing'"):
        build_expert("det", default_spec("det", H, C, GRID, SIZE, score_head="match"))
