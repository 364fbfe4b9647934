"""ShapesWorld: synthetic images and videos of shapes with exact ground truth, deterministic from a seed.

A scene holds 1-N shapes (:data:`~taskmllm.data.shapesworld.vocab.SHAPES`) x colors x sizes, drawn as polygons in depth
order (later objects occlude earlier ones) on a plain, textured or real-photo background. Every sample is a
pure function of ``(config, seed, split, index)``: the same arguments give byte-identical pixels and masks.

Ground truth (:class:`Shape`, an :class:`~taskmllm.data.sample.ObjectGT`): class, color, size, the polygon, the exact visible
mask (the polygon's rasterization minus the nearer objects' rasterizations), the tight box of the visible
mask and its pixel count. Videos add per-frame polygons, masks, boxes, visibility (mask non-empty), presence
and the visible interval; objects move, may enter late, leave early, walk off the frame or be hidden.

Hallucination hooks: a **co-occurrence prior** (``WorldConfig.cooccurrence``: ``("star", "heart", 0.8)``
means "when a star is present, a heart is present with probability 0.8") and **held-out compositions**
(``WorldConfig.heldout``: ``(color, shape)`` pairs that never occur in the ``train`` and ``val`` splits;
``test`` samples all pairs; every ``heldout`` scene contains at least one held-out pair).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from PIL import Image

from taskmllm.data.sample import ObjectGT, Sample
from taskmllm.data.shapesworld.backgrounds import KINDS, Backgrounds
from taskmllm.data.shapesworld.shapes import paint, place, rasterize, tight_box
from taskmllm.data.shapesworld.vocab import COLORS, SHAPES, SIZES
from taskmllm.errors import ConfigError

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "heldout": 3}


@dataclass(frozen=True)
class WorldConfig:
    """How ShapesWorld scenes are drawn.

    Attributes:
        image_size: side of the square images / frames in pixels.
        min_objects, max_objects: objects per scene (before the co-occurrence prior may add one).
        shape_weights: relative frequency of each shape (makes some objects "popular", for POPE).
        colors, sizes: the attribute values used.
        backgrounds: background kinds drawn uniformly (``photo`` falls back to ``textured`` without skimage).
        cooccurrence: ``(given, then, p)``: when ``given`` is present, ``then`` is present with probability p.
        heldout: ``(color, shape)`` compositions never drawn in ``train``/``val``.
        min_visible_fraction: in images, every object keeps at least this fraction of its area visible.
        max_rotation_deg: objects are rotated uniformly within +-this.
        num_frames: T of videos.
        max_speed: per-frame speed limit of video objects, as a fraction of the image side.
        enter_prob, leave_prob: probability that a video object enters after frame 0 / leaves before the end.
        use_photos: allow scikit-image photo backgrounds.
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 6
    shape_weights: tuple[tuple[str, float], ...] = (
        ("circle", 0.24), ("square", 0.2), ("triangle", 0.18), ("star", 0.12), ("hexagon", 0.14),
        ("heart", 0.12))
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = KINDS
    cooccurrence: tuple[tuple[str, str, float], ...] = (("star", "heart", 0.8), ("triangle", "square", 0.7))
    heldout: tuple[tuple[str, str], ...] = (("red", "star"), ("blue", "hexagon"), ("yellow", "heart"))
    min_visible_fraction: float = 0.4
    max_rotation_deg: float = 12.0
    num_frames: int = 8
    max_speed: float = 0.05
    enter_prob: float = 0.3
    leave_prob: float = 0.3
    use_photos: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 200:
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= 200, got {self.min_objects}, {self.max_objects}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        known = set(SHAPES)
        for name, _ in self.shape_weights:
            if name not in known:
                raise ConfigError(f"unknown shape {name!r} in shape_weights; known: {SHAPES}")
        for a, b, p in self.cooccurrence:
            if a not in known or b not in known or not 0 <= p <= 1 or a == b:
                raise ConfigError(f"bad co-occurrence rule {(a, b, p)!r}")
        for color, shape in self.heldout:
            if color not in self.colors or shape not in known:
                raise ConfigError(f"bad held-out composition {(color, shape)!r}")
        for shape in known:
            if all((c, shape) in self.heldout for c in self.colors):
                raise ConfigError(f"every color of {shape!r} is held out; training could never show it")
        if any(k not in KINDS for k in self.backgrounds) or not self.backgrounds:
            raise ConfigError(f"backgrounds must be a non-empty subset of {KINDS}")

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes drawn, in ``shape_weights`` order."""
        return tuple(name for name, _ in self.shape_weights)


@dataclass
class Shape(ObjectGT):
    """A ShapesWorld object: an :class:`~taskmllm.data.sample.ObjectGT` whose ``category`` is its shape, with
    its color and size (also in ``labels``, for attribute supervision), the polygon drawn and its depth.

    Attributes:
        color, size: names from :data:`~taskmllm.data.shapesworld.vocab.COLORS` / ``SIZES``.
        polygon: ``(P, 2)`` float vertices (x, y) in pixels as rasterized (images).
        polygons: ``(T, P, 2)`` per-frame vertices (videos).
        depth: drawing order, larger is nearer.
    """

    color: Optional[str] = None
    size: Optional[str] = None
    polygon: Optional[np.ndarray] = None
    polygons: Optional[np.ndarray] = None
    depth: int = 0

    def __post_init__(self) -> None:
        self.labels = {**self.labels, "color": self.color, "size": self.size}

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.category}" if self.color else self.category


@dataclass
class _Spec:
    shape: str
    color: str
    size: str
    radius: float
    angle: float
    extra: dict = field(default_factory=dict)


class ShapesWorld:
    """Generator of ShapesWorld samples (scene ground truth, no turns: ``Sample.task == "scene"``).

    Args:
        config: scene parameters.
        seed: the data set's seed; ``(seed, split, index)`` determines a sample.
    """

    def __init__(self, config: Optional[WorldConfig] = None, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"the world's seed must be an integer >= 0, got {seed!r}")
        self.config = config or WorldConfig()
        self.seed = int(seed)
        self.backgrounds = Backgrounds(use_photos=self.config.use_photos)
        weights = np.array([w for _, w in self.config.shape_weights], dtype=np.float64)
        self._shape_p = weights / weights.sum()

    # ---------------------------------------------------------------------------------------- public
    def rng(self, split: str, kind: int, index: int) -> np.random.Generator:
        """The generator behind one sample (kind 0 = image, 1 = video)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        return np.random.default_rng([self.seed, SPLITS[split], kind, int(index)])

    def image(self, index: int, split: str = "train") -> Sample:
        """Scene ``index`` of ``split``: an ``(S, S, 3)`` uint8 image with per-object masks and boxes."""
        rng = self.rng(split, 0, index)
        s = self.config.image_size
        bg_kind = self.config.backgrounds[int(rng.integers(len(self.config.backgrounds)))]
        canvas = self.backgrounds.draw(bg_kind, s, s, rng)
        specs = self._specs(rng, split)
        # label map: 0 = background, k = k-th placed object; later (nearer) objects overwrite earlier ones
        label_img = Image.new("L", (s, s), 0)
        label = np.asarray(label_img)
        visible = np.zeros(len(specs) + 1, dtype=np.int64)  # visible pixels per label so far
        placed: list[tuple[_Spec, np.ndarray, int]] = []  # spec, polygon, full (unoccluded) area
        for spec in specs:
            for _ in range(30):
                margin = spec.radius * 0.9
                center = (rng.uniform(margin, s - margin), rng.uniform(margin, s - margin))
                poly = place(spec.shape, center, spec.radius, spec.angle)
                full = rasterize(poly, s, s)
                area = int(full.sum())
                if area and self._keeps_visible(label, visible, placed, full):
                    placed.append((spec, poly, area))
                    paint(label_img, [poly], [len(placed)])
                    label = np.asarray(label_img)
                    visible = np.bincount(label.ravel(), minlength=len(specs) + 1)
                    break
        label = np.asarray(label_img)
        paint(canvas, [poly for _, poly, _ in placed], [COLORS[spec.color] for spec, _, _ in placed])
        img = np.array(canvas)
        objects = []
        for i, (spec, poly, _) in enumerate(placed):
            vis = label == i + 1
            objects.append(Shape(id=i, category=spec.shape, color=spec.color, size=spec.size, mask=vis,
                                    box=tight_box(vis), area=int(vis.sum()), polygon=poly, depth=i))
        meta = self._meta(split, index, bg_kind)
        return Sample(id=f"shapesworld/{split}/image/{index}", source="shapesworld", image=img,
                      objects=objects, meta=meta)

    def video(self, index: int, split: str = "train") -> Sample:
        """Video ``index`` of ``split``: ``(T, S, S, 3)`` frames with per-frame masks, boxes and visibility."""
        cfg = self.config
        rng = self.rng(split, 1, index)
        s, t_len = cfg.image_size, cfg.num_frames
        bg_kind = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
        bg_img = self.backgrounds.draw(bg_kind, s, s, rng)
        specs = self._specs(rng, split)
        tracks = []  # (spec, polygons (T,P,2), present (T,))
        for spec in specs:
            for _ in range(20):
                track = self._trajectory(spec, rng)
                if track[2].any():  # objects hidden in every frame are dropped below
                    tracks.append(track)
                    break
        n = len(tracks)
        frames = np.empty((t_len, s, s, 3), dtype=np.uint8)
        label = np.empty((t_len, s, s), dtype=np.uint8)  # per frame: 0 background, k the k-th object
        for t in range(t_len):
            here = [i for i in range(n) if tracks[i][2][t]]
            polys_t = [tracks[i][1][t] for i in here]
            canvas, label_img = bg_img.copy(), Image.new("L", (s, s), 0)
            paint(canvas, polys_t, [COLORS[tracks[i][0].color] for i in here])
            paint(label_img, polys_t, [i + 1 for i in here])
            frames[t], label[t] = np.asarray(canvas), np.asarray(label_img)
        vis = label[None] == np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None]  # (n, T, S, S)
        objects = []
        for i, (spec, polys, present) in enumerate(tracks):
            visible = vis[i].reshape(t_len, -1).any(axis=1)
            boxes = np.zeros((t_len, 4))
            for t in np.flatnonzero(visible):
                boxes[t] = tight_box(vis[i, t])
            idx = np.flatnonzero(visible)
            interval = (int(idx[0]), int(idx[-1])) if idx.size else None
            objects.append(Shape(id=i, category=spec.shape, color=spec.color, size=spec.size, masks=vis[i],
                                    boxes=boxes, visible=visible, interval=interval, polygons=polys,
                                    present=present, depth=i))
        # an object hidden in every frame cannot be asked about: drop it from the ground truth
        objects = [o for o in objects if o.interval is not None]
        meta = self._meta(split, index, bg_kind)
        return Sample(id=f"shapesworld/{split}/video/{index}", source="shapesworld", frames=frames,
                      objects=objects, meta=meta)

    def _meta(self, split: str, index: int, background: str) -> dict:
        cfg = self.config
        unseen = [] if split in ("test", "heldout") else [list(p) for p in cfg.heldout]
        return {"split": split, "index": int(index), "background": background, "seed": self.seed,
                "height": cfg.image_size, "width": cfg.image_size, "shapes": list(cfg.shapes),
                "colors": list(cfg.colors), "unseen": unseen}

    def images(self, n: int, split: str = "train", start: int = 0) -> Iterator[Sample]:
        """Scenes ``start .. start + n - 1`` of ``split``."""
        for i in range(start, start + n):
            yield self.image(i, split)

    # ------------------------------------------------------------------------------------- internals
    def _specs(self, rng: np.random.Generator, split: str) -> list[_Spec]:
        cfg = self.config
        shapes = cfg.shapes
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        classes = [shapes[k] for k in rng.choice(len(shapes), size=n, p=self._shape_p)]
        forced: Optional[tuple[str, str]] = None
        if split == "heldout" and cfg.heldout:
            forced = cfg.heldout[int(rng.integers(len(cfg.heldout)))]
            classes[0] = forced[1]
        for given, then, p in cfg.cooccurrence:
            if given not in classes or then not in shapes:
                continue
            if rng.random() < p:
                if then not in classes:
                    others = [k for k, c in enumerate(classes) if c != given and k != 0]
                    if len(classes) < cfg.max_objects or not others:
                        classes.append(then)
                    else:
                        classes[others[int(rng.integers(len(others)))]] = then
            else:
                pool = [c for c in shapes if c not in (given, then)]
                classes = [pool[int(rng.integers(len(pool)))] if c == then else c for c in classes]
        n = len(classes)
        order = rng.permutation(n)  # depth order independent of the rule order
        u_color, u_size, u_jitter, u_angle = rng.random((4, n))
        specs = []
        for j, k in enumerate(order):
            shape = classes[k]
            if forced is not None and k == 0:
                color = forced[0]
            else:
                allowed = [c for c in cfg.colors
                           if split in ("test", "heldout") or (c, shape) not in cfg.heldout]
                color = allowed[int(u_color[j] * len(allowed))]
            size = cfg.sizes[int(u_size[j] * len(cfg.sizes))]
            radius = SIZES[size] * cfg.image_size * (0.93 + 0.14 * u_jitter[j])
            angle = np.deg2rad((2 * u_angle[j] - 1) * cfg.max_rotation_deg)
            specs.append(_Spec(shape, color, size, radius, angle))
        return specs

    def _keeps_visible(self, label: np.ndarray, visible: np.ndarray, placed: list, full: np.ndarray) -> bool:
        """Would every placed object keep ``min_visible_fraction`` of its area with ``full`` drawn on top?"""
        if not placed:
            return True
        n = len(placed)
        covered = np.bincount(label[full], minlength=n + 1)[1:n + 1]
        areas = np.array([area for _, _, area in placed])
        return bool(np.all(visible[1:n + 1] - covered >= self.config.min_visible_fraction * areas))

    def _trajectory(self, spec: _Spec, rng: np.random.Generator):
        cfg = self.config
        s, t_len = cfg.image_size, cfg.num_frames
        start = (rng.uniform(0, s), rng.uniform(0, s))
        speed = rng.uniform(0, cfg.max_speed * s)
        heading = rng.uniform(0, 2 * np.pi)
        vel = (speed * np.cos(heading), speed * np.sin(heading))
        spin = np.deg2rad(rng.uniform(-3, 3))
        t_in = int(rng.integers(1, max(2, t_len // 2))) if t_len > 2 and rng.random() < cfg.enter_prob else 0
        t_out = (int(rng.integers(max(t_in + 1, t_len // 2), t_len))
                 if t_len > 2 and rng.random() < cfg.leave_prob else t_len)
        present = np.zeros(t_len, dtype=bool)
        present[t_in:t_out] = True
        polys = np.stack([place(spec.shape, (start[0] + vel[0] * t, start[1] + vel[1] * t), spec.radius,
                                spec.angle + spin * t) for t in range(t_len)])
        lo, hi = polys.min(axis=1), polys.max(axis=1)  # (T, 2) polygon bounds
        present &= np.all(hi >= 0, axis=1) & np.all(lo < s, axis=1)  # in its interval and overlapping the frame
        return spec, polys, present
