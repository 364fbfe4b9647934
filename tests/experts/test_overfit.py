"""Each expert overfits a few shape scenes on CPU, trained jointly with a patch embedding and free query states
(standing in for the vision tower and the LLM). Single-threaded so that a busy machine does not slow it down."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.experts import ExpertPrompt, TaskTarget, build_expert, default_spec
from taskmllm.experts.boxes import box_iou, elementwise_box_iou
from tests.experts.harness import overfit
from tests.experts.shapes import draw_clip, draw_scene, mask_iou

SIZE, PATCH, C, H, M = 96, 12, 64, 64, 8
GRID = (SIZE // PATCH, SIZE // PATCH)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _report(name, run):
    print(f"\n{name}: metric {run.metric:.3f} after {run.steps} steps, {run.cpu_seconds:.1f} s CPU, "
          f"{run.wall_seconds:.1f} s wall; history {[(s, round(v, 2)) for s, v in run.history]}")


def test_segmentation_overfits_to_iou_above_0_9():
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng, SIZE, 3) for _ in range(M)]
    pixels = torch.tensor(np.stack([s.image for s in scenes]))[:, None]
    targets = [TaskTarget("seg", phrase=f"shape {i % 3}", mask=s.masks[i % 3]) for i, s in enumerate(scenes)]
    torch.manual_seed(0)
    expert = build_expert("seg", default_spec("seg", H, C, GRID, SIZE))

    def min_iou(out):
        results = expert.postprocess(out, [(SIZE, SIZE)] * M)
        return min(mask_iou(r.mask, t.mask) for r, t in zip(results, targets))

    run = overfit(expert, pixels, targets, min_iou, goal=0.9, patch=PATCH, max_steps=500)
    _report("seg", run)
    assert run.metric > 0.9, run.history


def test_detection_overfits_all_boxes_iou_above_0_8():
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng, SIZE, 1 + i % 4) for i in range(M)]  # 1-4 objects, K = 8 slots (the default)
    pixels = torch.tensor(np.stack([s.image for s in scenes]))[:, None]
    targets = [TaskTarget("det", boxes=s.boxes) for s in scenes]
    torch.manual_seed(0)
    expert = build_expert("det", default_spec("det", H, C, GRID, SIZE))

    def worst_matched_iou(out):
        """Min IoU over all target boxes after matching; 0 unless exactly the matched slots score > 0.5."""
        worst = 1.0
        for i, target in enumerate(targets):
            tgt = torch.from_numpy(target.boxes)
            rows, cols = expert.matcher.match(out.boxes[i], out.logits[i], tgt)
            kept = out.logits[i] > 0
            if not kept[rows].all() or int(kept.sum()) != len(tgt):
                return 0.0
            worst = min(worst, float(box_iou(out.boxes[i][rows], tgt[cols]).diagonal().min()))
        return worst

    run = overfit(expert, pixels, targets, worst_matched_iou, goal=0.8, patch=PATCH, max_steps=500)
    _report("det", run)
    assert run.metric > 0.8, run.history
    # the user-facing result agrees: as many boxes as targets, in pixels of the original size
    results = expert.postprocess(run.outputs, [(2 * SIZE, SIZE)] * M)
    for result, target in zip(results, targets):
        assert len(result.boxes) == len(target.boxes)
        ious = box_iou(torch.from_numpy(result.boxes) / torch.tensor([SIZE, 2 * SIZE] * 2), torch.from_numpy(target.boxes))
        assert (ious.max(dim=0).values > 0.8).all()


def test_tracking_overfits_mean_iou_above_0_8():
    rng = np.random.default_rng(0)
    frames = 6
    clips = [draw_clip(rng, SIZE, frames, hidden=(2,) if i % 2 else ()) for i in range(M)]
    pixels = torch.tensor(np.stack([c.frames for c in clips]))
    targets = [TaskTarget("track", boxes=c.boxes, visible=c.visible) for c in clips]
    # half the targets are given by a box in the prompt (their first-frame box), half by the query alone
    prompts = [ExpertPrompt(box=c.boxes[0]) if i % 2 == 0 else ExpertPrompt(phrase="the target") for i, c in enumerate(clips)]
    torch.manual_seed(0)
    expert = build_expert("track", default_spec("track", H, C, GRID, SIZE))
    visible = torch.from_numpy(np.stack([c.visible for c in clips]))
    truth = torch.from_numpy(np.stack([c.boxes for c in clips]))

    def mean_iou(out):
        """Mean IoU over visible frames; 0 unless every frame's visibility is right."""
        if not ((out.visibility_logits > 0) == visible).all():
            return 0.0
        return float(elementwise_box_iou(out.boxes, truth)[visible].mean())

    run = overfit(expert, pixels, targets, mean_iou, goal=0.8, patch=PATCH, max_steps=500, prompts=prompts)
    _report("track", run)
    assert run.metric > 0.8, run.history
