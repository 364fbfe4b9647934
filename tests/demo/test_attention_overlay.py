"""The attention overlay's drawing: a hand-made map with one hot cell lands on that cell of the picture, in the
colormap's top color blended over the picture; panels and frames are laid out as documented."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from taskmllm.attention_overlay import OPACITY, TITLE_HEIGHT, AttentionPanel, AttentionView


def _expected(base: int, value: float) -> np.ndarray:
    color = np.asarray(colormaps["inferno"](value)[:3]) * 255
    return (1 - OPACITY) * base + OPACITY * color


def test_hot_cell_is_drawn_on_its_patch_with_one_scale_for_both_panels():
    frame = Image.new("RGB", (300, 300), (128, 128, 128))
    hot = np.zeros((1, 3, 3), np.float32)
    hot[0, 0, 2] = 0.5  # row 0, column 2: the top-right patch
    half = hot / 2  # the other panel: the same place, half the attention
    view = AttentionView([AttentionPanel("without", "a", half), AttentionPanel("with", "b", hot)], [frame], "all")
    out = np.asarray(view.render()).astype(float)
    assert out.shape == (300 + TITLE_HEIGHT, 600, 3)
    centre = lambda panel, r, c: out[TITLE_HEIGHT + 50 + 100 * r, 300 * panel + 50 + 100 * c]  # noqa: E731
    assert np.allclose(centre(1, 0, 2), _expected(128, 1.0), atol=3), "the larger map's maximum is the top color"
    assert np.allclose(centre(0, 0, 2), _expected(128, 0.5), atol=3), "the other panel on the same scale"
    assert np.allclose(centre(1, 2, 0), _expected(128, 0.0), atol=3), "no attention: the bottom color"
    assert view.summary()["panels"][1]["image_attention"] == 0.5 and view.panels[0].mass == 0.25


def test_video_panels_are_rows_of_frames_and_small_pictures_are_enlarged():
    frames = [Image.new("RGB", (64, 32), (0, 0, 0)) for _ in range(3)]
    maps = np.random.default_rng(0).random((3, 2, 2)).astype(np.float32)
    view = AttentionView([AttentionPanel("without", "", maps), AttentionPanel("with", "", maps)], frames, "selected")
    assert view.render().size == (3 * 512, 2 * (256 + TITLE_HEIGHT)), "min side 256, frames as columns"
