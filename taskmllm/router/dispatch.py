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
        calls: the calls it ran on, in batch order (all with the same number of frames); empty for a placeholder.
        outputs: the expert's forward output for them (e.g. ``SegmentationOutput``).
        group_size: the task's calls in the batch; this run's loss weighs ``len(calls) / group_size`` in the task's.
        placeholder: a zero-weight run on a placeholder call (see :func:`run_calls`): its outputs carry no loss.
    """

    task: str
    calls: list[TaskCall]
    outputs: object
    group_size: int
    placeholder: bool = False


def run_calls(experts: Mapping[str, Expert], calls: Sequence[TaskCall], inputs: Optional[ExpertInputs],
              prompt_boxes: Optional[Sequence[Optional[torch.Tensor]]] = None,
              tasks: Optional[Collection[str]] = None, detach_context: Collection[str] = (),
              placeholders: Optional[Mapping[str, torch.Tensor]] = None) -> list[ExpertRun]:
    """Run every expert on its calls, in the order of ``experts`` (the same on every rank of a distributed run).

    Args:
        experts: name -> expert.
        calls: routed calls of the batch.
        inputs: what the batch offers its experts (None for a text-only batch, which must have no calls).
        prompt_boxes: per sample, a ``(4,)`` normalized box given in the prompt (a tracking target), or None.
        tasks: the experts to run (default all); the others' calls are skipped.
        detach_context: experts that read the LLM's visual-token states without gradient, so their loss reaches
            the LLM only through their task queries.
        placeholders: task -> ``(K, H)`` query states for a placeholder call: each of these experts that has no
            call in the batch runs on one call about the batch's first image with these states, and its run is
            marked ``placeholder`` (training gives its outputs zero weight). Every expert then runs on every batch:
            the static graph that data-parallel engines need (an expert's parameters take part in every step, on
            every rank, in the same order).

    Raises:
        InputError: a call about a sample without an image.
    """
    runs: list[ExpertRun] = []
    by_task = group_calls(calls)
    for task in experts:
        if tasks is not None and task not in tasks:
            continue
        group, placeholder = by_task.get(task, []), False
        if not group and placeholders is not None and task in placeholders and inputs is not None:
            group, placeholder = [placeholder_call(task, placeholders[task], inputs)], True
        if not group:
            continue
        if inputs is None:
            raise InputError(f"sample {group[0].sample} has a task call but no image")
        states = inputs.visual_states
        if states is not None and task in detach_context:
            states = states.detach()
        by_frames: dict[int, list[TaskCall]] = {}
        for c in group:  # an image expert reads first frames only: one run whatever the frame counts
            by_frames.setdefault(inputs.frames_per_sample[c.sample] if experts[task].video else 1, []).append(c)
        for _, same in sorted(by_frames.items()):
            features = call_features(experts[task], same, inputs, states)
            queries = torch.stack([c.query_states for c in same]).to(features.features)
            prompts = [ExpertPrompt(c.phrase, _box(prompt_boxes, c.sample, features.features)) for c in same]
            outputs = experts[task](queries, features, prompts)
            runs.append(ExpertRun(task, [] if placeholder else same, outputs, len(group), placeholder))
    return runs


def placeholder_call(task: str, query_states: torch.Tensor, inputs: ExpertInputs) -> TaskCall:
    """A call of ``task`` about the batch's first sample with an image, with the given ``(K, H)`` query states."""
    sample = next(i for i, n in enumerate(inputs.frames_per_sample) if n > 0)
    return TaskCall(task, sample, -1, None, query_states)


def call_features(expert: Expert, calls: Sequence[TaskCall], inputs: ExpertInputs,
                  visual_states: Optional[torch.Tensor] = None) -> VisionFeatures:
    """The :class:`VisionFeatures` of ``calls`` (their samples' frames, stacked): ``(M, T, N, C)`` features,
    ``(M, T, N', H)`` visual-token states (``visual_states``, default ``inputs.visual_states``) and, for an
    expert that reads them, ``(M, T, 3, S, S)`` pixels; T = 1 for an image expert (a video's first frame)."""
    rows = [inputs.frames(c.sample) for c in calls]
    if not expert.video:
        rows = [slice(r.start, r.start + 1) for r in rows]  # (M, T, ...) -> (M, 1, ...): the first frame
    states = inputs.visual_states if visual_states is None else visual_states
    features = torch.stack([inputs.features[r] for r in rows])  # (M, T, N, C)
    context = None if states is None else torch.stack([states[r] for r in rows])
    pixels = None
    if inputs.pixels is not None and expert.reads_pixels:
        pixels = torch.stack([inputs.pixels[r] for r in rows])
    return VisionFeatures(features, inputs.grid, inputs.image_size,
                          None if context is None else context.to(features.dtype), inputs.visual_grid,
                          None if pixels is None else pixels.to(features.dtype))


def _box(prompt_boxes: Optional[Sequence[Optional[torch.Tensor]]], sample: int,
         like: torch.Tensor) -> Optional[torch.Tensor]:
    """Sample ``sample``'s prompt box on ``like``'s device, if any."""
    box = None if prompt_boxes is None else prompt_boxes[sample]
    return None if box is None else torch.as_tensor(box).to(device=like.device)
