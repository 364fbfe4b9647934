"""Backgrounds for ShapesWorld: plain, textured, and real photos (scikit-image's bundled images).

Photos come from the image files scikit-image ships in its package (no download is ever attempted); when
scikit-image is missing, :class:`Backgrounds` offers only ``plain`` and ``textured``. Photos are loaded once
per :class:`Backgrounds` instance (no module-level cache) and shown at reduced contrast so the shapes stay
visible.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

KINDS: tuple[str, ...] = ("plain", "textured", "photo")

#: Muted, mostly neutral background colors, far from the saturated object palette.
PLAIN_COLORS: tuple[tuple[int, int, int], ...] = (
    (235, 235, 235), (200, 200, 200), (120, 120, 120), (60, 60, 60), (225, 215, 195), (190, 200, 210),
    (30, 30, 30), (250, 248, 240))

#: skimage.data bundled files used as photos (name -> file in skimage/data).
PHOTO_FILES: tuple[str, ...] = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png",
                                "coins.png", "ihc.png", "brick.png", "grass.png", "gravel.png", "moon.png",
                                "page.png")


def _skimage_data_dir() -> Optional[str]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "data")
    return path if os.path.isdir(path) else None


class Backgrounds:
    """Draws ``(H, W, 3)`` uint8 backgrounds from an ``np.random.Generator``.

    Args:
        photo_side: photos are kept downscaled so their short side is this many pixels (fast crops).
        use_photos: set False to never use scikit-image photos.
    """

    def __init__(self, photo_side: int = 192, use_photos: bool = True) -> None:
        self.photo_side = photo_side
        self._use_photos = use_photos
        self._photos: Optional[list[Image.Image]] = None

    @property
    def photos(self) -> list[Image.Image]:
        """The available photos as RGB PIL images (empty without scikit-image)."""
        if self._photos is None:
            self._photos = self._load_photos() if self._use_photos else []
        return self._photos

    def kinds(self) -> tuple[str, ...]:
        """The background kinds available here."""
        return KINDS if self.photos else KINDS[:2]

    def _load_photos(self) -> list[Image.Image]:
        root = _skimage_data_dir()
        photos = []
        if root is None:
            return photos
        for name in PHOTO_FILES:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    scale = self.photo_side / min(im.size)
                    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                   Image.BILINEAR)
                    photos.append(im.copy())
            except OSError:
                continue
        return photos

    def draw(self, kind: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
        """A ``width`` x ``height`` RGB PIL image of ``kind`` (``photo`` falls back to ``textured`` when no photo
        is available). PIL does the pixel work: it is several times faster than numpy at this size."""
        if kind == "photo" and not self.photos:
            kind = "textured"
        if kind == "plain":
            return Image.new("RGB", (width, height), PLAIN_COLORS[int(rng.integers(len(PLAIN_COLORS)))])
        if kind == "textured":
            return self._texture(height, width, rng)
        if kind == "photo":
            return self._photo(height, width, rng)
        raise ValueError(f"unknown background kind {kind!r}; expected one of {KINDS}")

    def array(self, kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """:meth:`draw` as an ``(H, W, 3)`` uint8 array."""
        return np.array(self.draw(kind, height, width, rng))

    def _texture(self, height: int, width: int, rng: np.random.Generator) -> Image.Image:
        base = np.array(PLAIN_COLORS[int(rng.integers(len(PLAIN_COLORS)))], np.float64)
        style = int(rng.integers(3))
        lo_res = 32  # patterns are made small and upsampled
        if style == 0:  # smooth noise: a coarse random grid upsampled
            cells = int(rng.integers(3, 9))
            pattern = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
            resample = Image.BILINEAR
        elif style == 1:  # stripes at a random angle
            angle, period = rng.random() * np.pi, rng.uniform(6, 20) * lo_res / max(height, width)
            yy, xx = np.mgrid[0:lo_res, 0:lo_res]
            wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
            pattern, resample = Image.fromarray(((wave + 1) * 127.5).astype(np.uint8)), Image.BILINEAR
        else:  # checkerboard
            cells = int(rng.integers(6, 20))
            board = (np.add.outer(np.arange(cells), np.arange(cells)) % 2 * 255).astype(np.uint8)
            pattern, resample = Image.fromarray(board), Image.NEAREST
        amp = rng.uniform(15, 35)
        dark = tuple(int(v) for v in np.clip(base - amp, 0, 255))
        light = tuple(int(v) for v in np.clip(base + amp, 0, 255))
        return ImageOps.colorize(pattern.resize((width, height), resample), dark, light)

    def _photo(self, height: int, width: int, rng: np.random.Generator) -> Image.Image:
        photo = self.photos[int(rng.integers(len(self.photos)))]
        ph, pw = photo.height, photo.width
        side = int(rng.integers(min(ph, pw) // 2, min(ph, pw) + 1))
        y0, x0 = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
        crop = photo.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        return ImageEnhance.Contrast(crop).enhance(0.6)  # reduced contrast keeps the shapes visible
