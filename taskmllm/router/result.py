"""Result of a Pipeline call: the answer text and each task call's output, as JSON or drawn on the image."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from taskmllm.model.tokens import strip_protocol

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


@dataclass
class CallResult:
    """One task call's output at the original image size.

    Attributes:
        task: ``"seg"``, ``"det"``, ``"track"`` (or a user-registered expert).
        phrase: the ``<ref>`` phrase, if any.
        mask: ``(H, W)`` bool (segmentation).
        boxes: ``(M, 4)`` pixel ``x1, y1, x2, y2`` (detection) or ``(T, 4)`` per frame (tracking).
        scores: ``(M,)`` box scores (detection) or ``(T,)`` visibility (tracking).
    """

    task: str
    phrase: Optional[str] = None
    mask: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None


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
        """JSON-ready: masks as COCO RLE (pycocotools), boxes in pixels."""
        from pycocotools import mask as mask_utils

        calls = []
        for c in self.calls:
            item: dict[str, Any] = {"task": c.task, "phrase": c.phrase}
            if c.mask is not None:
                rle = mask_utils.encode(np.asfortranarray(c.mask.astype(np.uint8)))
                item["mask_rle"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            if c.boxes is not None:
                item["boxes"] = np.round(c.boxes, 2).tolist()
            if c.scores is not None:
                item["scores" if c.task != "track" else "visibility"] = np.round(c.scores, 4).tolist()
            calls.append(item)
        return {"text": self.text, "raw_text": self.raw_text, "calls": calls, "timings": self.timings}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def draw(self, score_threshold: float = 0.5) -> Image.Image | list[Image.Image]:
        """The image with masks (distinct colors), boxes with scores and phrase labels; a list for a video."""
        if self.frames:
            return [self._draw_frame(f, t, score_threshold) for t, f in enumerate(self.frames)]
        if self.image is None:
            raise ValueError("this result has no image to draw on")
        return self._draw_frame(self.image, None, score_threshold)

    def _draw_frame(self, image: Image.Image, frame: Optional[int], threshold: float) -> Image.Image:
        canvas = np.asarray(image.convert("RGB")).astype(np.float32)
        boxes: list[tuple[tuple, str, tuple]] = []
        for i, c in enumerate(self.calls):
            color = PALETTE[i % len(PALETTE)]
            label = c.phrase or c.task
            if c.mask is not None and frame is None:
                m = c.mask.astype(bool)
                canvas[m] = 0.5 * canvas[m] + 0.5 * np.array(color, np.float32)
                ys, xs = np.nonzero(m)
                if len(xs):
                    boxes.append(((xs.min(), ys.min(), xs.max(), ys.max()), label, color))
            if c.boxes is not None and c.task == "track" and frame is not None and frame < len(c.boxes):
                vis = 1.0 if c.scores is None else float(c.scores[frame])
                if vis >= threshold:
                    boxes.append((tuple(c.boxes[frame]), f"{label} {vis:.2f}", color))
            elif c.boxes is not None and c.task != "track" and frame is None:
                for j, box in enumerate(c.boxes):
                    score = 1.0 if c.scores is None else float(c.scores[j])
                    if score >= threshold:
                        boxes.append((tuple(box), f"{label} {score:.2f}", color))
        out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(out)
        for box, label, color in boxes:
            draw.rectangle(box, outline=color, width=2)
            draw.text((box[0] + 2, max(0, box[1] - 11)), label, fill=color)
        return out

    @property
    def plain_text(self) -> str:
        return strip_protocol(self.raw_text)
