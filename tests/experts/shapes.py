"""Tiny shape scenes with exact ground truth for the expert tests (PIL polygons/ellipses on a plain background).

Self-contained on purpose: the expert tests must not depend on the data engine they will later be fed by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

KINDS = ("ellipse", "rectangle", "triangle")


@dataclass
class Scene:
    """image ``(3, S, S)`` float32 in [0, 1]; masks ``(n, S, S)`` bool visible masks; boxes ``(n, 4)`` normalized xyxy."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


@dataclass
class Clip:
    """frames ``(T, 3, S, S)``; boxes ``(T, 4)`` normalized xyxy of the target (zeros where hidden); visible ``(T,)``."""

    frames: np.ndarray
    boxes: np.ndarray
    visible: np.ndarray


def _draw(draw: ImageDraw.ImageDraw, kind: str, xyxy: tuple[float, float, float, float], fill) -> None:
    x1, y1, x2, y2 = xyxy
    if kind == "ellipse":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif kind == "rectangle":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight normalized xyxy box of a bool ``(S, S)`` mask (pixel edges: x2 = (last column + 1) / S)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], dtype=np.float32)


def render(size: int, background, shapes: list[tuple[str, tuple, tuple]]) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``(kind, xyxy pixels, rgb)`` in order; returns image ``(3, S, S)`` and visible masks ``(n, S, S)``."""
    image = Image.new("RGB", (size, size), tuple(background))
    draw = ImageDraw.Draw(image)
    masks = []
    for kind, xyxy, color in shapes:
        _draw(draw, kind, xyxy, tuple(color))
        layer = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(layer), kind, xyxy, 255)
        mask = np.asarray(layer) > 0
        masks = [m & ~mask for m in masks]  # later shapes occlude earlier ones
        masks.append(mask)
    arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return arr, np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)


def _random_colors(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    palette = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200), (40, 200, 200)]
    idx = rng.choice(len(palette), size=n, replace=False)
    return [palette[i] for i in idx]


def draw_scene(rng: np.random.Generator, size: int = 96, num_shapes: int = 3, min_side: float = 0.22,
               max_side: float = 0.4) -> Scene:
    """Shapes at non-overlapping random places on a plain gray background."""
    placed: list[tuple[float, float, float, float]] = []
    while len(placed) < num_shapes:
        side_w, side_h = rng.uniform(min_side, max_side, size=2) * size
        x1, y1 = rng.uniform(0, size - side_w), rng.uniform(0, size - side_h)
        box = (x1, y1, x1 + side_w, y1 + side_h)
        if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in placed):
            placed.append(box)
    kinds = [KINDS[i] for i in rng.integers(0, len(KINDS), size=num_shapes)]
    colors = _random_colors(rng, num_shapes)
    gray = int(rng.integers(90, 160))
    image, masks = render(size, (gray, gray, gray), list(zip(kinds, placed, colors)))
    boxes = np.stack([mask_box(m) for m in masks])
    return Scene(image=image, masks=masks, boxes=boxes)


def draw_clip(rng: np.random.Generator, size: int = 96, num_frames: int = 6, hidden: tuple[int, ...] = (),
              side: float = 0.3) -> Clip:
    """A target shape moving in a straight line past a static distractor; not drawn in ``hidden`` frames."""
    s = side * size
    start = rng.uniform(0, size - s, size=2)
    end = rng.uniform(0, size - s, size=2)
    kind_t, kind_d = (KINDS[i] for i in rng.choice(len(KINDS), size=2, replace=False))
    color_t, color_d = _random_colors(rng, 2)
    d_xy = rng.uniform(0, size - 0.6 * s, size=2)
    distractor = (kind_d, (d_xy[0], d_xy[1], d_xy[0] + 0.6 * s, d_xy[1] + 0.6 * s), color_d)
    frames, boxes, visible = [], [], []
    for t in range(num_frames):
        a = t / max(num_frames - 1, 1)
        x1, y1 = (1 - a) * start + a * end
        shapes = [distractor]
        if t not in hidden:
            shapes.append((kind_t, (x1, y1, x1 + s, y1 + s), color_t))  # drawn last: never occluded
        image, masks = render(size, (128, 128, 128), shapes)
        frames.append(image)
        shown = t not in hidden
        visible.append(shown)
        boxes.append(mask_box(masks[-1]) if shown else np.zeros(4, dtype=np.float32))
    return Clip(frames=np.stack(frames), boxes=np.stack(boxes), visible=np.array(visible))


class PatchEmbed(nn.Module):
    """A trainable stand-in vision tower: ``(B, 3, S, S) -> (B, N, C)`` with a stride-``patch`` Conv2d."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(2).transpose(1, 2)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
