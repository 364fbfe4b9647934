"""A grid PNG of samples for people: pixels, target masks (tinted), boxes, and the conversation text.

``taskmllm data preview --n 16 --out grid.png`` renders ShapesWorld samples with it
(:func:`taskmllm.data.shapesworld.preview.preview_main`). Images show every target mask lightly tinted with its
outline drawn, and every target box outlined (ground-truth object boxes thin and grey when the sample has no box
target); videos show four frames with the tracked box per frame (dashed red frame border where the target is
invisible). Text under each cell: task, question, answer.
"""

from __future__ import annotations

import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from taskmllm.data.sample import Sample

_TINTS = ((255, 0, 255), (0, 255, 0), (255, 255, 0), (0, 255, 255))
_BOX = (255, 0, 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _norm_to_px(box: np.ndarray, side: int) -> list[float]:
    return [float(v) * side for v in box]


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (its inner outline)."""
    pad = np.pad(mask, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def _image_cell(sample: Sample, side: int) -> Image.Image:
    img = sample.image.astype(np.float32)
    h, w = img.shape[:2]
    outlines = []
    for k, t in enumerate(sample.targets):
        if t.mask is not None:  # light tint inside (the object's color stays readable), outline around
            m = np.asarray(t.mask, dtype=bool)
            tint = np.array(_TINTS[k % len(_TINTS)], np.float32)
            img[m] = 0.75 * img[m] + 0.25 * tint
            outlines.append((_edge(m), tint))
    big = np.array(Image.fromarray(img.astype(np.uint8)).resize((side, side), Image.NEAREST))
    for edge, tint in outlines:
        grown = np.array(Image.fromarray(edge).resize((side, side), Image.NEAREST))
        big[grown] = tint.astype(np.uint8)
    pic = Image.fromarray(big)
    draw = ImageDraw.Draw(pic)
    boxed = False
    for t in sample.targets:
        for b in (np.zeros((0, 4)) if t.boxes is None else np.asarray(t.boxes)):
            draw.rectangle(_norm_to_px(b, side), outline=_BOX, width=2)
            boxed = True
    if not boxed:
        for o in sample.objects:
            if o.box is not None:
                x1, y1, x2, y2 = (float(v) for v in o.box)
                draw.rectangle([x1 / w * side, y1 / h * side, x2 / w * side, y2 / h * side],
                               outline=(150, 150, 150), width=1)
    return pic


def _video_cell(sample: Sample, side: int) -> Image.Image:
    frames = sample.frames
    t_len = frames.shape[0]
    picks = sorted({round(i * (t_len - 1) / 3) for i in range(4)})
    half = side // 2
    cell = Image.new("RGB", (side, side), (0, 0, 0))
    target = sample.targets[0] if sample.targets else None
    font = _font(11)
    for k, t in enumerate(picks):
        pic = Image.fromarray(frames[t]).resize((half, half), Image.NEAREST)
        draw = ImageDraw.Draw(pic)
        if target is not None and target.boxes is not None:
            if target.visible is None or bool(target.visible[t]):
                draw.rectangle(_norm_to_px(target.boxes[t], half), outline=_BOX, width=2)
            else:
                draw.rectangle([0, 0, half - 1, half - 1], outline=_BOX, width=1)
                draw.text((4, half - 14), "not visible", fill=_BOX, font=font)
            if target.prompt_box is not None and t == 0:
                draw.rectangle(_norm_to_px(target.prompt_box, half), outline=(0, 255, 0), width=1)
        draw.text((3, 2), f"t={t}", fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        cell.paste(pic, ((k % 2) * half, (k // 2) * half))
    return cell


def render_preview(samples: Sequence[Sample], path: str, cell: int = 256, cols: Optional[int] = None,
                   text_lines: int = 7) -> str:
    """Render ``samples`` (pixels loaded or loadable) as a grid PNG at ``path``; returns the path.

    Args:
        cell: side in pixels of each sample's picture.
        cols: grid columns (default: about the square root of the sample count).
        text_lines: lines of wrapped text under each picture.
    """
    samples = [s.load() for s in samples]
    n = max(1, len(samples))
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    font = _font(12)
    line_h, pad = 15, 6
    text_h = text_lines * line_h + pad
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    wrap = max(16, cell // 7)
    for i, s in enumerate(samples):
        x0 = pad + (i % cols) * (cell + pad)
        y0 = pad + (i // cols) * (cell + text_h + pad)
        grid.paste(_video_cell(s, cell) if s.is_video else _image_cell(s, cell), (x0, y0))
        lines = [(f"[{s.task}] {s.source}", (90, 90, 90))]
        for q, a in s.turns:
            lines += [(t, (0, 0, 0)) for t in textwrap.wrap("Q: " + q.replace("\n", " "), wrap)]
            lines += [(t, (0, 0, 170)) for t in textwrap.wrap("A: " + a, wrap)]
        if len(lines) > text_lines:
            lines = lines[:text_lines - 1] + [("...", (0, 0, 0))]
        for k, (line, color) in enumerate(lines):
            draw.text((x0, y0 + cell + 3 + k * line_h), line, fill=color, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, format="PNG")
    return path
