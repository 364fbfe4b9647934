"""Image inputs -> RGB PIL images, with one explicit size cap checked before any pixel is decoded.

An image is a path, a PIL image or a numpy array (RGB, RGBA, grayscale, 16-bit, float 0-1). Pillow guards
against decompression bombs with a warning above 89 MP and an exception above 179 MP; taskmllm also refuses
any image of more than :data:`MAX_IMAGE_PIXELS` (64 megapixels: an 8K frame or a 48 MP photo fits) with an
:class:`~taskmllm.errors.ImageError`, reading only the file's header first (``Image.open`` + size, never
``load``). The cap is a parameter (``load_image(..., max_pixels=)``, ``Processor.max_image_pixels``,
``MediaLimits.max_image_pixels``), not a global.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from taskmllm.errors import ImageError
from taskmllm.model.io import check_input_file, show_path

ImageInput = Union[str, Path, Image.Image, np.ndarray]

#: The most pixels (width x height) an input image may have.
MAX_IMAGE_PIXELS = 64_000_000

#: What Pillow's format plugins raise on a malformed file (a truncated GIF raises ``struct.error``, a bad TIFF tag
#: ``KeyError`` or ``IndexError``): the decoders read untrusted bytes, so each is "not a readable image".
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                 KeyError, TypeError, ZeroDivisionError, OverflowError)


def check_image_size(width: int, height: int, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """:class:`ImageError` when a ``width x height`` image (called ``name``) is empty or over ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name} is {width}x{height} = {width * height / 1e6:.3g} megapixels; the limit is "
                         f"{max_pixels / 1e6:.3g} megapixels (max_image_pixels)")


def bomb_message(name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """The message for a file Pillow refuses to open as a decompression bomb (over twice its own limit)."""
    return (f"{name} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (a decompression bomb?); the "
            f"limit is {max_pixels / 1e6:.3g} megapixels (max_image_pixels)")


def open_image_file(path: Union[str, Path], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file, check its header's size against ``max_pixels``, then decode it.

    Returns the decoded image (the first frame of an animation), detached from the file.

    Raises:
        ImageError: the path is not a readable regular file, the file is not an image Pillow reads, or its
            size is zero or over ``max_pixels`` (checked before decoding).
    """
    check_input_file(path, "image", ImageError)
    name = f"image {show_path(Path(path).name)}"
    try:
        with Image.open(path) as im:  # reads the header only
            check_image_size(im.width, im.height, name, max_pixels)
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:  # over Pillow's own hard limit, raised by open itself
        raise ImageError(bomb_message(name, max_pixels)) from exc
    except ImageError:
        raise
    except DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode image file {Path(path).name}: it is not a readable image "
                         f"({type(exc).__name__}: {exc})") from exc


def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Any supported image input -> an RGB PIL image.

    Raises:
        ImageError: naming the problem: an unreadable file, an unsupported type or array (strings, objects,
            NaN/inf values, a bad shape), a closed or zero-size PIL image, more than ``max_pixels`` pixels.
    """
    if isinstance(image, (str, Path)):
        image = open_image_file(image, max_pixels)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, max_pixels)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"unsupported image type {type(image).__name__}; use a path, PIL image or numpy array")
    check_image_size(image.width, image.height, "image", max_pixels)
    return to_rgb(image)


def _array_to_pil(arr: np.ndarray, max_pixels: int) -> Image.Image:
    """An ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` array (uint8, uint16, other integers clipped to 0-255,
    bool, float 0-1) -> a PIL image."""
    if arr.size == 0:
        raise ImageError(f"image array has zero size (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    check_image_size(arr.shape[1], arr.shape[0], "image array", max_pixels)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"image array must hold numbers (integers or floats 0-1), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageError("image array has NaN or infinite values; pixels must be finite (floats in 0-1)")
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode -> RGB: 16/32-bit integer modes scaled to 8 bits, alpha composited on white.

    Raises:
        ImageError: a closed image, or a mode Pillow cannot convert.
    """
    try:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(image, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise ImageError(f"image of mode {image.mode} has NaN or infinite values")
            peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
            image = Image.fromarray((arr / peak * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ImageError:
        raise
    except (ValueError, OSError) as exc:  # "Operation on closed image", "conversion from La to L not supported"
        raise ImageError(f"cannot use a PIL image of mode {image.mode!r}: {exc}") from exc
