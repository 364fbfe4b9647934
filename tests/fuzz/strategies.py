"""Hypothesis strategies of what users hand taskmllm: any Python value, arrays, PIL images, image and video
files (valid, corrupted, or lying about their size), text with lone surrogates and protocol tokens."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

PROTOCOL = ["<image>", "<video>", "<query>", "<ref>", "</ref>", "<box>", "</box>", "<seg>", "<det>", "<track>",
            "<box>1,2,3,4</box>", "<box>999,0,-5,x</box>", "</s>", "<s>", "<pad>", "USER:", " ASSISTANT:"]
PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA", "RGBa", "RGBX",
             "I;16", "I;16B", "I;16L", "I;16N", "BGR;15", "BGR;16", "BGR;24"]


def anything() -> st.SearchStrategy:
    """Values of every common type, including the awkward ones (NaN, inf, bytes, classes, nested lists)."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(-3, 3),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
        st.lists(st.one_of(st.integers(-3, 3), st.floats(), st.text(max_size=2)), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2),
        st.sampled_from([object(), float, int, np.float32(0.5), np.int64(3), np.array([1, 2]), torch_generator()]),
    )


def torch_generator():
    import torch

    return torch.Generator().manual_seed(0)


def texts() -> st.SearchStrategy[str]:
    """Unicode text with lone surrogates, control characters and protocol tokens mixed in."""
    pieces = st.one_of(
        st.text(max_size=20),
        st.text(alphabet=st.characters(codec=None, categories=None), max_size=10),  # surrogates included
        st.sampled_from(PROTOCOL),
        st.integers(0xD800, 0xDFFF).map(chr),
        st.sampled_from(["\x00", "\n", "\r\n", "\t", "\u200b", "\ufeff", "💥", " " * 30]),
    )
    return st.lists(pieces, max_size=8).map("".join)


def arrays() -> st.SearchStrategy[np.ndarray]:
    """Arrays of any dtype (numbers, bools, strings, objects) and shape (0 to 5 dims), and huge views."""
    dtypes = st.one_of(hnp.scalar_dtypes(), st.sampled_from([np.dtype("U3"), np.dtype("S2"), np.dtype("O")]))
    small = hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=20),
                       elements=None, fill=st.nothing())
    huge = st.tuples(st.integers(8000, 30000), st.integers(8000, 30000), st.sampled_from([(), (3,), (4,)])).map(
        lambda s: np.broadcast_to(np.uint8(7), (s[0], s[1], *s[2])))  # no memory behind it: the cap must not read it
    return st.one_of(small, huge)


@st.composite
def pil_images(draw) -> Image.Image:
    """PIL images of many modes and sizes (some closed)."""
    mode = draw(st.sampled_from(PIL_MODES))
    size = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
    try:
        image = Image.new(mode, size)
    except (ValueError, OSError, TypeError):  # a mode Pillow itself cannot create
        image = Image.new("RGB", size)
    if draw(st.booleans()) and draw(st.booleans()):
        image.close()
    return image


def _png_header(width: int, height: int, bit_depth: int = 1, color: int = 0) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose data is a few zero rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """``(suffix, content)``: a valid small image, one corrupted (bytes flipped, truncated), a header lying about
    its size (up to 2**31 pixels a side), or random bytes."""
    kind = draw(st.sampled_from(["valid", "flipped", "truncated", "header", "random", "empty"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    suffix = {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, f".{fmt.lower()}")
    if kind == "header":
        side = st.one_of(st.integers(0, 70000), st.integers(0, 2**31 - 1))
        return ".png", _png_header(draw(side), draw(side), draw(st.sampled_from([1, 8, 16])),
                                   draw(st.sampled_from([0, 2, 6])))
    if kind == "random":
        return suffix, draw(st.binary(min_size=1, max_size=300))
    if kind == "empty":
        return suffix, b""
    buf = io.BytesIO()
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    Image.fromarray(np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, format=fmt)
    data = bytearray(buf.getvalue())
    if kind == "flipped":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    return suffix, bytes(data)


@st.composite
def video_files(draw) -> tuple[str, bytes]:
    """``(suffix, content)``: a small animated GIF (maybe corrupted), random bytes as mp4/webm/mkv/avi, or a GIF
    whose screen claims a huge size."""
    kind = draw(st.sampled_from(["gif", "gif-flipped", "gif-truncated", "random", "huge-gif"]))
    if kind == "random":
        return draw(st.sampled_from([".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"])), draw(st.binary(min_size=1,
                                                                                                        max_size=400))
    frames = [Image.fromarray(np.full((16, 16, 3), 40 * t, np.uint8)) for t in range(draw(st.integers(1, 5)))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    data = bytearray(buf.getvalue())
    if kind == "huge-gif":
        data[6:10] = struct.pack("<HH", draw(st.integers(8000, 65535)), draw(st.integers(8000, 65535)))
    elif kind == "gif-flipped":
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "gif-truncated":
        data = data[: draw(st.integers(1, len(data) - 1))]
    return ".gif", bytes(data)
