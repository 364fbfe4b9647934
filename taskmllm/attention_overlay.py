"""Where the answer looked: the answer's attention to the visual tokens drawn over the picture, with and without an
intervention — the PNG of ``taskmllm predict --attention`` and the demo's attention panel.

The maps come from :func:`~taskmllm.model.interventions.attention_map.attention_maps` (each run's own greedy
answer, teacher-forced with eager attention; rows that predict an answer token; attention mass on each visual
token of the LLM's pooled grid). Heads: with an intervention, the heads it acted on (VHR's reinforced heads, VAR's
heads with a redistributed row, ZeroTuning's scaled heads), the same heads in both maps; when it acted on none (a
model without visual sinks under official-mode VAR, an identity calibration) or without an intervention, every
head of every layer. Both maps share one color scale (the larger maximum), so a brighter patch is more attention,
not a renormalised picture; each panel's title gives the answer and its total attention on the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from taskmllm.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.generation import Intervention
    from taskmllm.router.pipeline import Pipeline

MIN_SIDE = 256  # panels are shown at least this large (ShapesWorld pictures are 128-192 px)
TITLE_HEIGHT = 30
OPACITY = 0.6


@dataclass
class AttentionPanel:
    """One map: its title, the answer it was computed for, and ``(F, h, w)`` attention mass (F frames)."""

    title: str
    answer: str
    maps: np.ndarray

    @property
    def mass(self) -> float:
        """The answer's mean total attention on the picture (summed over visual tokens, mean over frames)."""
        return float(self.maps.sum() / len(self.maps))


@dataclass
class AttentionView:
    """The panels of one request (``[without, with]`` for an intervention, ``[plain]`` otherwise), the frames they
    are drawn on and which heads were averaged (``"selected"`` or ``"all"``)."""

    panels: list[AttentionPanel]
    frames: list[Image.Image]
    heads: str

    def summary(self) -> dict[str, Any]:
        """JSON-able: heads and per panel its title, answer and attention mass on the picture."""
        return {"heads": self.heads, "panels": [{"title": p.title, "answer": p.answer, "image_attention":
                                                 round(p.mass, 4)} for p in self.panels]}

    def render(self) -> Image.Image:
        """One RGB image: an image's panels side by side; a video's panels as rows, one column per frame."""
        scale = max(p.maps.max() for p in self.panels) or 1.0
        tiles = [[_overlay(frame, m / scale) for frame, m in zip(self.frames, p.maps)] for p in self.panels]
        w, h = tiles[0][0].size
        video = len(self.frames) > 1
        cols, rows = (len(self.frames), len(self.panels)) if video else (len(self.panels), 1)
        canvas = Image.new("RGB", (cols * w, rows * (h + TITLE_HEIGHT)), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (panel, row) in enumerate(zip(self.panels, tiles)):
            for j, tile in enumerate(row):
                x, y = (j * w, i * (h + TITLE_HEIGHT)) if video else (i * w, 0)
                canvas.paste(tile, (x, y + TITLE_HEIGHT))
                if j == 0:
                    draw.text((x + 3, y + 2), _fit(panel.title, w), fill="black")
                    draw.text((x + 3, y + 15), _fit(f"{panel.answer!r} · on image {panel.mass:.2f}", w), fill="black")
        return canvas


def _fit(text: str, width: int) -> str:
    """``text`` cut to about what fits in ``width`` pixels of PIL's default font (~6 px per character)."""
    limit = max(8, width // 6)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _overlay(frame: Image.Image, heat: np.ndarray) -> Image.Image:
    """``frame`` with the ``(h, w)`` map in ``[0, 1]`` stretched over it (the processor stretches the picture to
    the square grid the same way), as a colormap blended at :data:`OPACITY`."""
    from matplotlib import colormaps

    size = frame.size
    if min(size) < MIN_SIDE:
        k = MIN_SIDE / min(size)
        size = (round(size[0] * k), round(size[1] * k))
    base = frame.convert("RGB").resize(size, Image.NEAREST)
    grid = Image.fromarray(np.clip(heat, 0.0, 1.0).astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    colored = (colormaps["inferno"](np.asarray(grid))[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colored), OPACITY)


def _panel(pipe: "Pipeline", title: str, result, frames: int) -> AttentionPanel:
    maps = result.maps[0]
    answer = pipe.processor.decode(result.answers[0])
    return AttentionPanel(title, answer, maps.reshape(frames, *maps.shape[-2:]))


def attention_view(pipe: "Pipeline", visual: Any, instruction: str, intervention: Optional["Intervention"] = None,
                   max_new_tokens: int = 16) -> AttentionView:
    """The answer's attention over ``visual`` (an image or a list of frames) for ``instruction``: without and with
    ``intervention`` (or the plain model alone when it is None).

    Raises:
        InputError: no image or video (a text-only request has nothing to look at).
    """
    from taskmllm.model.interventions.attention_map import attention_maps, compare_attention_maps
    from taskmllm.model.processor import load_image

    if visual is None:
        raise InputError("a text-only request has no picture to show the attention on: give an image or a video")
    processor = pipe.processor
    frames: Sequence = processor.frames(visual)
    batch = processor([instruction], [visual])
    mllm = pipe.model.mllm
    heads = "all"
    if intervention is None:
        panels = [_panel(pipe, "no intervention · all heads", attention_maps(mllm, batch, None,
                                                                              max_new_tokens=max_new_tokens),
                         len(frames))]
    else:
        with_iv, without = compare_attention_maps(mllm, batch, intervention, max_new_tokens=max_new_tokens)
        if with_iv.maps[0] is not None:
            heads = "selected"
        else:  # the intervention acted on no head for this request: show every head
            with_iv = attention_maps(mllm, batch, intervention, max_new_tokens=max_new_tokens)
            without = attention_maps(mllm, batch, None, max_new_tokens=max_new_tokens)
        name = type(intervention).__name__
        label = "its selected heads" if heads == "selected" else f"all heads ({name} selected none)"
        panels = [_panel(pipe, f"without · {label}", without, len(frames)),
                  _panel(pipe, f"with {name} · {label}", with_iv, len(frames))]
    return AttentionView(panels, [load_image(f) for f in frames], heads)
