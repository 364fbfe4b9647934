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
        category: class name (a COCO category name, ``"pedestrian"``, a ShapesWorld shape).
        mask: ``(H, W)`` bool visible mask (images).
        box: ``(4,)`` float pixel box tight to ``mask`` (images).
        area: visible pixel count (images).
        masks: ``(T, H, W)`` bool visible mask per frame (videos; ``None`` for box-only tracks).
        boxes: ``(T, 4)`` float pixel box per frame (zeros where invisible) (videos).
        visible: ``(T,)`` bool, the object can be seen in the frame (videos).
        interval: ``(first, last)`` frame (0-based, inclusive) in which the object is visible (videos).
        present: ``(T,)`` bool, the object is in the scene and its outline overlaps the frame (it may still
            be fully occluded or cover no pixel).
        labels: further class labels of the object by kind (e.g. ``{"color": "red"}``), besides its
            ``category``; auxiliary losses can supervise any kind a source labels (:meth:`label`).
        rle: the image mask as a compressed COCO RLE (``{"size": [H, W], "counts": ...}``) when a loader keeps it
            compressed (a large annotation file's masks would not fit in memory decoded); ``mask`` is then None
            and :meth:`mask_array` decodes it.
    """

    id: int
    category: str
    mask: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    area: Optional[int] = None
    masks: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    visible: Optional[np.ndarray] = None
    interval: Optional[tuple[int, int]] = None
    present: Optional[np.ndarray] = None
    labels: dict[str, str] = field(default_factory=dict)
    rle: Optional[dict] = None

    @property
    def name(self) -> str:
        """How captions name it (its category; sources with richer labels override this)."""
        return self.category

    def label(self, kind: str) -> Optional[str]:
        """The object's class of labelling ``kind``: its ``category`` for ``"category"``, else ``labels[kind]``."""
        return self.category if kind == "category" else self.labels.get(kind)

    def mask_array(self) -> Optional[np.ndarray]:
        """The ``(H, W)`` bool image mask: ``mask``, or ``rle`` decoded (pycocotools), or None."""
        if self.mask is not None or self.rle is None:
            return self.mask
        from pycocotools import mask as mask_utils

        return mask_utils.decode(self.rle).astype(bool)

    def frame_mask(self, t: int, hw: tuple[int, int]) -> Optional[np.ndarray]:
        """``(H, W)`` bool region of the object in frame ``t`` (0 for an image): its mask, else its box filled,
        else None (nothing known)."""
        mask = self.masks[t] if self.masks is not None else self.mask_array()
        if mask is not None:
            return np.asarray(mask, bool)
        box = self.boxes[t] if self.boxes is not None else self.box
        if box is None or (self.visible is not None and not bool(self.visible[t])):
            return None
        out = np.zeros(hw, bool)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        out[max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = True
        return out


@dataclass(frozen=True)
class Grounding:
    """What the text before the visual tokens names, and where: the target of region-phrase alignment.

    The visual tokens that follow a question can depend on it, so training can teach them to mark the regions
    the question names (region-phrase alignment, an auxiliary loss of ``taskmllm.training.aux``). Any grounded source fills it: ShapesWorld's conversation
    builder, a referring expression of RefCOCO, a COCO category question.

    Attributes:
        text: the text that names the regions (the question or a referring expression).
        objects: ids of the sample's objects it names; ``()`` when it names something absent from the image.
    """

    text: str
    objects: tuple[int, ...] = ()


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
        grounding: what the first question names and where (:class:`Grounding`), or None (nothing, or unknown).
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
    grounding: Optional[Grounding] = None
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
                   suffix: str = "", grounding: Optional[Grounding] = None) -> "Sample":
        """A copy with new turns, targets and grounding (pixels and objects shared, not copied)."""
        return dataclasses.replace(self, id=self.id + (f"/{suffix}" if suffix else ""), task=task,
                                   turns=list(turns), targets=list(targets), meta=dict(self.meta),
                                   grounding=grounding)

    def load(self) -> "Sample":
        """This sample with pixels in memory (reads ``image_path`` / ``frame_paths`` when needed); a text-only
        sample (no pixels and no paths: a conversation without an image) comes back as it is.

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
            return self  # text only
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
