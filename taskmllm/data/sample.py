"""The one sample type every data source produces: ShapesWorld, LLaVA JSON, COCO/RefCOCO and MOT.

Conventions (shared by every loader and the conversation builder):

- Pixels: an image is ``(H, W, 3)`` uint8, a video ``(T, H, W, 3)`` uint8 (``frames``). Real-format loaders
  may leave pixels on disk (``image_path`` / ``frame_paths``); :meth:`Sample.load` reads them.
- Object boxes (:class:`ObjectGT`) are in **pixels**, ``x1, y1, x2, y2`` with exclusive ends: a box tight to
  a mask is ``(xmin, ymin, xmax + 1, ymax + 1)`` of the mask's pixels. Expert targets
  (:class:`~taskmllm.experts.base.TaskTarget`) hold boxes **normalized** to 0-1 (pixel box / (W, H, W, H)).
- ``turns`` are ``(question, answer)`` pairs; ``targets`` hold one ``TaskTarget`` per task token in the
  answers, in the order the task tokens appear (turn by turn, left to right).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from taskmllm.errors import ImageError
from taskmllm.experts.base import TaskTarget


@dataclass
class ObjectGT:
    """Ground truth of one object (an image instance or a video track).

    Attributes:
        id: object id, unique within its sample.
        category: class name (``"circle"``, a COCO category name, ``"pedestrian"``).
        color, size: ShapesWorld attributes (``None`` for real data).
        mask: ``(H, W)`` bool visible mask (images).
        box: ``(4,)`` float pixel box tight to ``mask`` (images).
        area: visible pixel count (images).
        polygon: ``(P, 2)`` float vertices (x, y) in pixels as rasterized (images; ShapesWorld only).
        masks: ``(T, H, W)`` bool visible mask per frame (videos; ``None`` for box-only tracks).
        boxes: ``(T, 4)`` float pixel box per frame (zeros where invisible) (videos).
        visible: ``(T,)`` bool, the object can be seen in the frame (videos).
        interval: ``(first, last)`` frame (0-based, inclusive) in which the object is visible (videos).
        polygons: ``(T, P, 2)`` per-frame vertices (videos; ShapesWorld only).
        present: ``(T,)`` bool, the object is in the scene and its outline overlaps the frame (it may still
            be fully occluded or cover no pixel).
        depth: drawing order, larger is nearer (ShapesWorld only).
    """

    id: int
    category: str
    color: Optional[str] = None
    size: Optional[str] = None
    mask: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    area: Optional[int] = None
    polygon: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    visible: Optional[np.ndarray] = None
    interval: Optional[tuple[int, int]] = None
    polygons: Optional[np.ndarray] = None
    present: Optional[np.ndarray] = None
    depth: int = 0

    @property
    def name(self) -> str:
        """``"red circle"`` style name (category alone when there is no color)."""
        return f"{self.color} {self.category}" if self.color else self.category


@dataclass
class Sample:
    """One training/evaluation sample.

    Attributes:
        id: unique id within its source (e.g. ``"shapesworld/train/42/seg"``).
        source: ``"shapesworld"``, ``"llava"``, ``"coco"``, ``"refcoco"`` or ``"mot"``.
        task: what the turns ask (``"caption"``, ``"exist"``, ``"seg"``, ``"det"``, ``"track"``, ...;
            ``"scene"`` for ground truth without turns, ``"conversation"`` for LLaVA JSON).
        image: ``(H, W, 3)`` uint8 or ``None`` (video, or pixels not loaded yet).
        frames: ``(T, H, W, 3)`` uint8 or ``None``.
        turns: ``[(question, answer), ...]``; questions hold ``<image>`` / ``<video>``.
        targets: one :class:`TaskTarget` per task token in the answers, in order.
        objects: ground-truth objects.
        meta: free-form extras (background kind, split, file names, ...).
        focus: ids of the objects the first question names (``()``: it names something absent; None: nothing,
            or unknown). The visual tokens come after that question, so training can teach them where to look.
        image_path / frame_paths: where the pixels are when not loaded.
    """

    id: str
    source: str
    task: str = "scene"
    image: Optional[np.ndarray] = None
    frames: Optional[np.ndarray] = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    targets: list[TaskTarget] = field(default_factory=list)
    objects: list[ObjectGT] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    focus: Optional[tuple[int, ...]] = None
    image_path: Optional[str] = None
    frame_paths: Optional[list[str]] = None

    @property
    def is_video(self) -> bool:
        """True when the sample is a video (frames, or frame paths)."""
        return self.frames is not None or self.frame_paths is not None

    @property
    def loaded(self) -> bool:
        """True when the pixels are in memory."""
        return self.frames is not None if self.is_video else self.image is not None

    @property
    def hw(self) -> tuple[int, int]:
        """``(H, W)`` of the image or frames (needs the pixels, or ``meta['height'/'width']``)."""
        px = self.frames[0] if self.frames is not None else self.image
        if px is not None:
            return int(px.shape[0]), int(px.shape[1])
        return int(self.meta["height"]), int(self.meta["width"])

    @property
    def num_frames(self) -> int:
        """T for a video, 1 for an image."""
        if self.frames is not None:
            return int(self.frames.shape[0])
        return len(self.frame_paths) if self.frame_paths is not None else 1

    def with_turns(self, task: str, turns: list[tuple[str, str]], targets: list[TaskTarget],
                   suffix: str = "", focus: Optional[tuple[int, ...]] = None) -> "Sample":
        """A copy with new turns, targets and focus (pixels and objects shared, not copied)."""
        return dataclasses.replace(self, id=self.id + (f"/{suffix}" if suffix else ""), task=task,
                                   turns=list(turns), targets=list(targets), meta=dict(self.meta), focus=focus)

    def load(self) -> "Sample":
        """This sample with pixels in memory (reads ``image_path`` / ``frame_paths`` when needed).

        Raises:
            ImageError: a file is missing, corrupt, or frames differ in size.
        """
        if self.loaded:
            return self
        if self.frame_paths is not None:
            frames = [read_rgb(p) for p in self.frame_paths]
            if not frames or len({f.shape for f in frames}) != 1:
                raise ImageError(f"{self.id}: frames are missing or differ in size")
            return dataclasses.replace(self, frames=np.stack(frames))
        if self.image_path is None:
            raise ImageError(f"{self.id}: sample has neither pixels nor an image path")
        return dataclasses.replace(self, image=read_rgb(self.image_path))


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8.

    Raises:
        ImageError: the file is missing, corrupt or empty.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc
    if arr.size == 0:
        raise ImageError(f"image {path} is empty")
    return arr
