"""Each expert overfits a small batch of ShapesWorld samples on CPU, trained jointly with a patch embedding and
free query states (standing in for the vision tower and the LLM). Single-threaded so that a busy machine does
not slow it down."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.experts import ExpertPrompt, build_expert, default_spec
from taskmllm.experts.boxes import box_iou, elementwise_box_iou
from tests.experts.harness import overfit
from taskmllm.data.shapesworld.conversations import ConversationBuilder, ConversationConfig
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from tests.experts.shapes import mask_iou

SIZE, PATCH, C, H, M = 96, 12, 64, 64, 8
GRID = (SIZE // PATCH, SIZE // PATCH)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapesworld(task: str, n: int, seed: int = 0, frames: int = 6) -> list:
    """The first ``n`` ShapesWorld training samples of ``task`` (one target each), at the test's image size."""
    world = ShapesWorld(WorldConfig(image_size=SIZE, num_frames=frames, max_objects=4), seed=seed)
    builder, rng, samples, i = ConversationBuilder(ConversationConfig()), np.random.default_rng(seed), [], 0
    while len(samples) < n:
        scene = world.video(i, "train") if task == "track" else world.image(i, "train")
        sample = builder.build(scene, task, rng)
        if sample is not None and (task != "det" or len(sample.targets[0].boxes) > 0):
            samples.append(sample)
        i += 1
    return samples


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """``(M, T, S, S, 3)`` uint8 -> ``(M, T, 3, S, S)`` float in [0, 1]."""
    return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255.0


def _report(name, run):
    print(f"\n{name}: metric {run.metric:.3f} after {run.steps} steps, {run.cpu_seconds:.1f} s CPU, "
          f"{run.wall_seconds:.1f} s wall; history {[(s, round(v, 2)) for s, v in run.history]}")


def test_segmentation_overfits_to_iou_above_0_9():
    samples = shapesworld("seg", M)
    pixels = to_pixels(np.stack([s.image for s in samples])[:, None])
    targets = [s.targets[0] for s in samples]
    torch.manual_seed(0)
    expert = build_expert("seg", default_spec("seg", H, C, GRID, SIZE))

    def min_iou(out):
        results = expert.postprocess(out, [(SIZE, SIZE)] * M)
        return min(mask_iou(r.mask, t.mask) for r, t in zip(results, targets))

    run = overfit(expert, pixels, targets, min_iou, goal=0.9, patch=PATCH, max_steps=500)
    _report("seg", run)
    assert run.metric > 0.9, run.history


def test_detection_overfits_all_boxes_iou_above_0_8():
    samples = shapesworld("det", M)  # "find all <shape>": 1-4 boxes, K = 8 slots (the default)
    pixels = to_pixels(np.stack([s.image for s in samples])[:, None])
    targets = [s.targets[0] for s in samples]
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
    samples = shapesworld("track", M)
    pixels = to_pixels(np.stack([np.stack(s.frames) for s in samples]))
    targets = [s.targets[0] for s in samples]
    # half the targets are given by a box in the prompt (their first-frame box), half by the phrase alone
    prompts = [ExpertPrompt(box=t.prompt_box) if i % 2 == 0 else ExpertPrompt(phrase=t.phrase)
               for i, t in enumerate(targets)]
    torch.manual_seed(0)
    expert = build_expert("track", default_spec("track", H, C, GRID, SIZE))
    visible = torch.from_numpy(np.stack([t.visible for t in targets]))
    truth = torch.from_numpy(np.stack([t.boxes for t in targets]).astype(np.float32))

    def mean_iou(out):
        """Mean IoU over visible frames; 0 unless every frame's visibility is right."""
        if not ((out.visibility_logits > 0) == visible).all():
            return 0.0
        return float(elementwise_box_iou(out.boxes, truth)[visible].mean())

    run = overfit(expert, pixels, targets, mean_iou, goal=0.8, patch=PATCH, max_steps=500, prompts=prompts)
    _report("track", run)
    assert run.metric > 0.8, run.history
