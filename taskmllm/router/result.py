"""Result of a Pipeline call: the answer text and each task call's output, as JSON or drawn on the image.

Every call's output is its expert's own :class:`~taskmllm.experts.base.ExpertResult`, which draws and
serializes itself; this module only lays the calls out (colors, labels, frames).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from taskmllm.errors import InputError
from taskmllm.experts.base import ExpertResult
from taskmllm.experts.canvas import Canvas

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


@dataclass
class CallResult:
    """One task call: its task, its ``<ref>`` phrase and its expert's output at the original image size.

    Attributes:
        task: the expert's name (``"seg"``, ``"det"``, ``"track"`` or a user-registered expert).
        phrase: the ``<ref>`` phrase, if any.
        output: the expert's result (e.g. a ``SegmentationResult``); None when the call had no image to read.

    ``mask``, ``boxes`` and ``scores`` read the output's field of that name (None when it has none): a
    segmentation's ``(H, W)`` bool mask, a detection's ``(M, 4)`` pixel boxes and ``(M,)`` scores, a track's
    ``(T, 4)`` boxes and ``(T,)`` visibility.
    """

    task: str
    phrase: Optional[str] = None
    output: Optional[ExpertResult] = None

    @property
    def mask(self) -> Optional[np.ndarray]:
        return getattr(self.output, "mask", None)

    @property
    def boxes(self) -> Optional[np.ndarray]:
        return getattr(self.output, "boxes", None)

    @property
    def scores(self) -> Optional[np.ndarray]:
        return getattr(self.output, "scores", None)

    def to_dict(self) -> dict[str, Any]:
        """``task``, ``phrase`` and the output's own fields (masks as COCO RLE, boxes in pixels)."""
        return {"task": self.task, "phrase": self.phrase, **({} if self.output is None else self.output.to_dict())}


@dataclass
class Result:
    """Answer of :class:`~taskmllm.router.pipeline.Pipeline` for one image or video.

    ``timings`` holds seconds spent by the whole batch in ``preprocess``, ``generate`` and ``experts``
    (routing + expert heads + postprocessing).
    """

    text: str
    raw_text: str
    calls: list[CallResult] = field(default_factory=list)
    image: Optional[Image.Image] = None
    frames: list[Image.Image] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the text, every call (:meth:`CallResult.to_dict`) and the timings."""
        return {"text": self.text, "raw_text": self.raw_text, "calls": [c.to_dict() for c in self.calls],
                "timings": self.timings}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def draw(self, score_threshold: float = 0.5) -> Image.Image | list[Image.Image]:
        """The image with every call's output (masks in distinct colors, boxes with scores, phrase labels); one
        image per frame for a video.

        Raises:
            InputError: the result has no image or frames to draw on.
        """
        if self.frames:
            return [self._draw_frame(f, t, score_threshold) for t, f in enumerate(self.frames)]
        if self.image is None:
            raise InputError("this result has no image to draw on")
        return self._draw_frame(self.image, None, score_threshold)

    def _draw_frame(self, image: Image.Image, frame: Optional[int], threshold: float) -> Image.Image:
        canvas = Canvas(image)
        for i, call in enumerate(self.calls):
            if call.output is not None:
                call.output.draw(canvas, frame, call.phrase or call.task, PALETTE[i % len(PALETTE)], threshold)
        return canvas.render()
