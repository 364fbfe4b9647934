"""A picture being annotated with expert outputs: what ``Result.draw`` shows.

Each expert's result draws itself onto a :class:`Canvas` (:meth:`ExpertResult.draw`): masks are blended into
the pixels as they come, boxes and their labels are collected and drawn last, on top of every mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

Color = tuple[int, int, int]


class Canvas:
    """An RGB image with pending boxes. ``fill`` blends a mask (and labels its bounding box), ``box`` adds a
    labelled rectangle; :meth:`render` returns the annotated image."""

    def __init__(self, image: Image.Image) -> None:
        self.pixels = np.asarray(image.convert("RGB")).astype(np.float32)  # (H, W, 3)
        self._boxes: list[tuple[tuple[float, float, float, float], str, Color]] = []

    def fill(self, mask: np.ndarray, color: Color, label: str) -> None:
        """Blend ``mask (H, W)`` half-and-half with ``color`` and label the mask's bounding box."""
        m = np.asarray(mask, bool)
        self.pixels[m] = 0.5 * self.pixels[m] + 0.5 * np.array(color, np.float32)
        ys, xs = np.nonzero(m)
        if len(xs):
            self._boxes.append(((xs.min(), ys.min(), xs.max(), ys.max()), label, color))

    def box(self, box: Sequence[float], label: str, color: Color) -> None:
        """A rectangle ``x1, y1, x2, y2`` (pixels) with ``label`` above it."""
        self._boxes.append((tuple(box), label, color))

    def render(self) -> Image.Image:
        """The image with every mask blended and every box drawn."""
        out = Image.fromarray(self.pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(out)
        for box, label, color in self._boxes:
            draw.rectangle(box, outline=color, width=2)
            draw.text((box[0] + 2, max(0, box[1] - 11)), label, fill=color)
        return out
