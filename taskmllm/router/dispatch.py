"""The one door to the experts: routed task calls + the batch's :class:`ExpertInputs` -> each expert's outputs.

Training (``JointModel.forward``, which adds the losses) and inference (``Pipeline``, which postprocesses) both
call :func:`run_calls`. Calls are batched per expert and, within an expert, per frame count (an image and an
8-frame video cannot share a tensor); an image expert called about a video reads its first frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Sequence

import torch

from taskmllm.errors import InputError
from taskmllm.experts.base import Expert, ExpertPrompt, VisionFeatures
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.router.router import TaskCall, group_calls


@dataclass
class ExpertRun:
    """One batched expert forward.

    Attributes:
        task: the expert's name.
        calls: the calls it ran on, in batch order (all with the same number of frames).
        outputs: the expert's forward output for them (e.g. ``SegmentationOutput``).
        group_size: the task's calls in the batch; this run's loss weighs ``len(calls) / group_size`` in the task's.
    """

    task: str
    calls: list[TaskCall]
    outputs: object
    group_size: int


def run_calls(experts: Mapping[str, Expert], calls: Sequence[TaskCall], inputs: Optional[ExpertInputs],
              prompt_boxes: Optional[Sequence[Optional[torch.Tensor]]] = None,
              tasks: Optional[Collection[str]] = None, detach_context: Collection[str] = ()) -> list[ExpertRun]:
    """Run every expert on its calls.

    Args:
        experts: name -> expert.
        calls: routed calls of the batch.
        inputs: what the batch offers its experts (None for a text-only batch, which must have no calls).
        prompt_boxes: per sample, a ``(4,)`` normalized box given in the prompt (a tracking target), or None.
        tasks: the experts to run (default all); the others' calls are skipped.
        detach_context: experts that read the LLM's visual-token states without gradient, so their loss reaches
            the LLM only through their task queries.

    Raises:
        InputError: a call about a sample without an image.
    """
    runs: list[ExpertRun] = []
    for task, group in group_calls(calls).items():
        if tasks is not None and task not in tasks:
            continue
        if inputs is None:
            raise InputError(f"sample {group[0].sample} has a task call but no image")
        states = inputs.visual_states
        if states is not None and task in detach_context:
            states = states.detach()
        by_frames: dict[int, list[TaskCall]] = {}
        for c in group:
            by_frames.setdefault(inputs.frames_per_sample[c.sample], []).append(c)
        for same in by_frames.values():
            features = call_features(experts[task], same, inputs, states)
            queries = torch.stack([c.query_states for c in same]).to(features.features)
            prompts = [ExpertPrompt(c.phrase, _box(prompt_boxes, c.sample, features.features)) for c in same]
            runs.append(ExpertRun(task, same, experts[task](queries, features, prompts), len(group)))
    return runs


def call_features(expert: Expert, calls: Sequence[TaskCall], inputs: ExpertInputs,
                  visual_states: Optional[torch.Tensor] = None) -> VisionFeatures:
    """The :class:`VisionFeatures` of ``calls`` (their samples' frames, stacked): ``(M, T, N, C)`` features,
    ``(M, T, N', H)`` visual-token states (``visual_states``, default ``inputs.visual_states``) and, for an
    expert that reads them, ``(M, T, 3, S, S)`` pixels; T = 1 for an image expert (a video's first frame)."""
    rows = [inputs.frames(c.sample) for c in calls]
    states = inputs.visual_states if visual_states is None else visual_states
    features = torch.stack([inputs.features[r] for r in rows])  # (M, T, N, C)
    context = None if states is None else torch.stack([states[r] for r in rows])
    pixels = None
    if inputs.pixels is not None and expert.reads_pixels:
        pixels = torch.stack([inputs.pixels[r] for r in rows])
    if not expert.video:
        features = features[:, :1]  # (M, T, N, C) -> (M, 1, N, C)
        context = None if context is None else context[:, :1]
        pixels = None if pixels is None else pixels[:, :1]
    return VisionFeatures(features, inputs.grid, inputs.image_size,
                          None if context is None else context.to(features.dtype), inputs.visual_grid,
                          None if pixels is None else pixels.to(features.dtype))


def _box(prompt_boxes: Optional[Sequence[Optional[torch.Tensor]]], sample: int,
         like: torch.Tensor) -> Optional[torch.Tensor]:
    """Sample ``sample``'s prompt box on ``like``'s device, if any."""
    box = None if prompt_boxes is None else prompt_boxes[sample]
    return None if box is None else torch.as_tensor(box).to(device=like.device)
