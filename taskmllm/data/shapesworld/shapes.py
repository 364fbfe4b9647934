"""Shape geometry and rasterization: every ShapesWorld object is a polygon drawn with PIL.

A shape is a ``(P, 2)`` polygon of unit circumradius centred on the origin (y points down, as in images);
:func:`place` rotates, scales and moves it; :func:`rasterize` draws it into a bool mask. The mask *is* the
object's rasterized area: the generator composes visible masks from these by depth order.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw


def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(2 * points, -np.pi / 2)
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)[:, None]
    return outer * radius


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


#: Unit polygons, ``(P, 2)`` float64, circumradius ~1, y down.
UNIT_POLYGONS: Mapping[str, np.ndarray] = MappingProxyType({
    "circle": _regular(40, 0.0),
    "square": _regular(4, np.pi / 4),
    "triangle": _regular(3, -np.pi / 2) + np.array([0.0, 0.2]),
    "star": _star(),
    "hexagon": _regular(6, 0.0),
    "heart": _heart(),
})


def place(shape: str, center: tuple[float, float], radius: float, angle: float = 0.0) -> np.ndarray:
    """The ``(P, 2)`` polygon of ``shape`` rotated by ``angle`` (radians), scaled to ``radius``, at ``center``."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return UNIT_POLYGONS[shape] @ rot.T * radius + np.asarray(center, dtype=np.float64)


def rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of a filled polygon (PIL's scan conversion; parts outside the image are clipped)."""
    im = Image.new("L", (width, height), 0)
    ImageDraw.Draw(im).polygon(np.asarray(polygon, dtype=np.float64).ravel().tolist(), fill=1, outline=1)
    return np.asarray(im, dtype=bool)


def paint(canvas: Image.Image, polygons: list[np.ndarray], fills: list) -> None:
    """Draw filled polygons in order (later ones on top) onto a PIL image in place.

    With the same scan conversion as :func:`rasterize`, so painting object ``k`` with ``fill=k`` onto an
    ``"L"`` image gives the label map whose ``== k`` pixels are exactly the visible masks.
    """
    draw = ImageDraw.Draw(canvas)
    for poly, fill in zip(polygons, fills):
        draw.polygon(np.asarray(poly, dtype=np.float64).ravel().tolist(), fill=fill, outline=fill)


def tight_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """``(4,)`` float pixel box ``(xmin, ymin, xmax + 1, ymax + 1)`` of a ``(H, W)`` mask, ``None`` if empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
