"""Pipeline: image or video + instruction -> :class:`Result` (text, masks, boxes, tracks).

    pipe = Pipeline.from_pretrained("path/to/checkpoint")
    result = pipe(image, "Segment the red circle.")
    result.text, result.calls[0].mask, result.draw()
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.model.generation import Intervention
from taskmllm.model.processor import VisualInput, load_image
from taskmllm.model.tokens import decode_boxes, strip_protocol
from taskmllm.router.dispatch import run_calls
from taskmllm.router.joint import JointModel
from taskmllm.router.result import CallResult, Result
from taskmllm.router.router import TaskCall


class Pipeline:
    """Inference over a :class:`JointModel`: generate, route the task calls, run the experts, postprocess."""

    def __init__(self, model: JointModel) -> None:
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = None) -> "Pipeline":
        """Load a checkpoint directory written by ``JointModel.save_pretrained``, or a shipped model by name
        (``"tiny"``, the embedded default), onto ``device``; ``dtype`` (e.g. ``torch.bfloat16``; None: as stored)
        loads the weights straight into that dtype, with no float32 copy (``JointModel.from_pretrained``)."""
        return cls(JointModel.from_pretrained(path, device=device, dtype=dtype))

    @property
    def processor(self):
        return self.model.mllm.processor

    @torch.no_grad()
    def __call__(self, visual: Union[VisualInput, Sequence[VisualInput]], prompt: Union[str, Sequence[str]],
                 max_new_tokens: int = 64, intervention: Optional[Intervention] = None,
                 score_threshold: Optional[float] = None, **generation) -> Union[Result, list[Result]]:
        """Answer ``prompt`` about ``visual`` (an image, a list of frames, or None).

        ``score_threshold``: the lowest detection score kept (None: the detection expert's option, 0.5);
        evaluation passes 0 so that COCO AP ranks every slot, as DETR's evaluation does.

        Lists of prompts (with a list of visuals) run as one batch and return a list of results.
        ``generation`` is passed to ``TaskMLLM.generate`` (``do_sample``, ``temperature``, ``top_p``, ...).
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        visuals = [visual] if single else list(visual)
        mllm = self.model.mllm
        prompt_boxes = [_prompt_box(p) for p in prompts]  # a malformed <box> fails before any compute
        t0 = time.perf_counter()
        batch = self.processor(prompts, visuals)
        t1 = time.perf_counter()
        out = mllm.generate(batch, max_new_tokens=max_new_tokens, intervention=intervention, **generation)
        t2 = time.perf_counter()
        calls = self.model.router.route_generation(out)
        per_call = self._run_experts(calls, out.expert_inputs, batch.frames_per_sample, prompt_boxes,
                                     score_threshold)
        timings = {"preprocess": t1 - t0, "generate": t2 - t1, "experts": time.perf_counter() - t2}
        results = []
        for b in range(len(prompts)):
            raw = mllm.processor.decode(out.sequences[b])
            results.append(Result(text=strip_protocol(raw, self.model.experts), raw_text=raw,
                                  calls=[per_call[id(c)] for c in calls if c.sample == b], timings=timings,
                                  **_pictures(visuals[b])))
        return results[0] if single else results

    def _run_experts(self, calls: list[TaskCall], inputs: Optional[ExpertInputs], frames_per_sample: list[int],
                     prompt_boxes: list[Optional[torch.Tensor]],
                     score_threshold: Optional[float] = None) -> dict[int, CallResult]:
        """Every call's :class:`CallResult`; a task token about no image keeps its text and gets no output."""
        results = {id(c): CallResult(c.task, c.phrase) for c in calls if frames_per_sample[c.sample] == 0}
        seeing = [c for c in calls if frames_per_sample[c.sample] > 0]
        options = {} if score_threshold is None else {"score_threshold": score_threshold}
        for run in run_calls(self.model.experts, seeing, inputs, prompt_boxes):
            sizes = [inputs.image_sizes[c.sample] for c in run.calls]
            for c, r in zip(run.calls, self.model.experts[run.task].postprocess(run.outputs, sizes, **options)):
                results[id(c)] = CallResult(run.task, c.phrase, r)
        return results


def _prompt_box(prompt: str) -> Optional[torch.Tensor]:
    """The first ``<box>`` of a prompt as a normalized ``(4,)`` tensor (a tracking target), if any."""
    boxes = decode_boxes(prompt)
    return torch.tensor(boxes[0], dtype=torch.float32) if boxes else None


def _pictures(visual: VisualInput) -> dict:
    if visual is None:
        return {}
    if isinstance(visual, (list, tuple)) or (isinstance(visual, np.ndarray) and visual.ndim == 4):
        return {"frames": [load_image(f) for f in visual]}
    return {"image": load_image(visual)}
