"""User media files -> pixels: images and videos (mp4/webm/mov/avi/mkv, animated GIF, a folder of frames).

Used by ``taskmllm predict`` and the Gradio demo so both accept the same files and reject bad ones with the
same typed errors::

    frames = read_video("clip.mp4", num_frames=8)     # uniformly sampled, first and last frame kept
    image = read_image("photo.jpg")                    # (H, W, 3) uint8
    gif = encode_animation(result.draw(), "gif")       # bytes of an annotated video

Container formats are decoded with PyAV (FFmpeg); GIF/WebP/APNG animations and frame folders with Pillow.
Limits (:class:`MediaLimits`) bound what a request may cost: file size, pixels per image or frame (checked from
the file's header, before decoding: a 48 KB PNG of 20000 x 20000 pixels is refused, not decoded), video
duration, decoded frames, and a minimum image side (a 1x1 "image" carries nothing to answer about).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageSequence

from taskmllm.errors import ConfigError, ImageError, VideoError
from taskmllm.model.images import (DECODE_ERRORS, MAX_IMAGE_PIXELS, bomb_message, check_image_size, open_image_file,
                                   to_rgb)
from taskmllm.model.io import check_input_file

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CONTAINER_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg")
VIDEO_SUFFIXES = (".gif", ".apng", *CONTAINER_SUFFIXES)


@dataclass(frozen=True)
class MediaLimits:
    """What one request may bring.

    Attributes:
        max_file_mb: largest accepted file (each file of a frame folder counts alone).
        min_side: smallest accepted image / frame side in pixels.
        max_video_seconds: longest accepted video (containers with a known duration).
        max_decoded_frames: most frames decoded from one video or folder (bounds time when no duration is known).
        max_image_pixels: most pixels (width x height) of an image or a video frame
            (:data:`~taskmllm.model.images.MAX_IMAGE_PIXELS`, 64 megapixels).
    """

    max_file_mb: float = 50.0
    min_side: int = 8
    max_video_seconds: float = 120.0
    max_decoded_frames: int = 3600
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        values = (self.max_file_mb, self.min_side, self.max_video_seconds, self.max_decoded_frames,
                  self.max_image_pixels)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in values) or self.min_side < 1 or self.max_decoded_frames < 1:
            raise ConfigError(f"media limits must be finite positive numbers, got {self}")


def _check_file(path: Path, limits: MediaLimits, what: str, error: type) -> None:
    size = check_input_file(path, what, error).st_size
    if size > limits.max_file_mb * 1024 * 1024:
        raise error(f"{what} file {path.name} is {size / 2**20:.1f} MB; the limit is {limits.max_file_mb:g} MB")


def _check_side(width: int, height: int, name: str, limits: MediaLimits, error: type) -> None:
    if min(width, height) < limits.min_side:
        raise error(f"{name} is {width}x{height} pixels; images must be at least {limits.min_side} pixels on each side")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image))


def read_image(path: PathLike, limits: MediaLimits = MediaLimits()) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (alpha composited on white).

    Raises:
        ImageError: missing, empty, too large (file size or pixels), undecodable, or smaller than
            ``limits.min_side``.
    """
    path = Path(path)
    _check_file(path, limits, "image", ImageError)
    image = open_image_file(path, limits.max_image_pixels)
    _check_side(image.width, image.height, f"image {path.name}", limits, ImageError)
    return _rgb(image)


def read_video(source: Union[PathLike, Sequence[PathLike]], num_frames: int,
               limits: MediaLimits = MediaLimits()) -> list[np.ndarray]:
    """A video as at most ``num_frames`` uniformly sampled ``(H, W, 3)`` uint8 frames (first and last kept).

    ``source`` is a video file (mp4, webm, mov, avi, mkv, animated GIF/WebP/PNG), a folder of frame images
    (sorted by name), or a list of frame image files (in the given order).

    Raises:
        VideoError: no frames, an undecodable file, frames of different sizes, over a limit.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if isinstance(source, (list, tuple)):
        return _read_frame_files([Path(p) for p in source], num_frames, limits)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(f"video folder {path} has zero frames (no {'/'.join(IMAGE_SUFFIXES)} files)")
        return _read_frame_files(files, num_frames, limits)
    _check_file(path, limits, "video", VideoError)
    if path.suffix.lower() in CONTAINER_SUFFIXES:
        return _read_container(path, num_frames, limits)
    return _read_animation(path, num_frames, limits)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``min(total, num_frames)`` indices spread uniformly over ``range(total)``, first and last included."""
    if total <= num_frames:
        return list(range(total))
    return sorted(set(np.linspace(0, total - 1, num_frames).round().astype(int).tolist()))


def _same_size(frames: list[np.ndarray], name: str, limits: MediaLimits) -> list[np.ndarray]:
    if not frames:
        raise VideoError(f"video {name} has zero frames")
    h, w = frames[0].shape[:2]
    _check_side(w, h, f"video {name}", limits, VideoError)
    for t, f in enumerate(frames):
        if f.shape[:2] != (h, w):
            raise VideoError(f"video {name}: frame {t} is {f.shape[1]}x{f.shape[0]} but frame 0 is {w}x{h}")
    return frames


def _read_frame_files(files: list[Path], num_frames: int, limits: MediaLimits) -> list[np.ndarray]:
    if not files:
        raise VideoError("video has zero frames (no frame files given)")
    if len(files) > limits.max_decoded_frames:
        raise VideoError(f"video has {len(files)} frames; the limit is {limits.max_decoded_frames}")
    frames = []
    for i in sample_indices(len(files), num_frames):
        try:
            frames.append(read_image(files[i], limits))
        except ImageError as exc:
            raise VideoError(f"frame {files[i].name}: {exc}") from exc
    return _same_size(frames, files[0].parent.name or "frames", limits)


def _read_animation(path: Path, num_frames: int, limits: MediaLimits) -> list[np.ndarray]:
    try:
        with Image.open(path) as im:
            check_image_size(im.width, im.height, f"video {path.name}", limits.max_image_pixels)
            total = getattr(im, "n_frames", 1)
            if total > limits.max_decoded_frames:
                raise VideoError(f"video {path.name} has {total} frames; the limit is {limits.max_decoded_frames}")
            keep = set(sample_indices(total, num_frames))
            frames = [_rgb(f) for t, f in enumerate(ImageSequence.Iterator(im)) if t in keep]
    except VideoError:
        raise
    except ImageError as exc:
        raise VideoError(str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise VideoError(bomb_message(f"video {path.name}", limits.max_image_pixels)) from exc
    except DECODE_ERRORS as exc:
        raise VideoError(f"cannot decode video file {path.name}: it is not a readable animation") from exc
    return _same_size(frames, path.name, limits)


def _read_container(path: Path, num_frames: int, limits: MediaLimits) -> list[np.ndarray]:
    import av

    try:
        with av.open(str(path)) as container:  # pass 1: duration and frame count, no decoding
            if not container.streams.video:
                raise VideoError(f"video {path.name} has zero frames (no video stream)")
            stream = container.streams.video[0]
            try:
                check_image_size(stream.codec_context.width, stream.codec_context.height, f"video {path.name}",
                                 limits.max_image_pixels)
            except ImageError as exc:
                raise VideoError(str(exc)) from exc
            seconds = container.duration / av.time_base if container.duration else None
            if seconds is not None and seconds > limits.max_video_seconds:
                raise VideoError(f"video {path.name} is {seconds:.1f} s long; the limit is "
                                 f"{limits.max_video_seconds:g} s")
            total = 0
            for packet in container.demux(stream):
                total += packet.size > 0
                if total > limits.max_decoded_frames:
                    raise VideoError(f"video {path.name} has more than {limits.max_decoded_frames} frames")
        keep = set(sample_indices(total, num_frames))
        frames, last = [], None
        with av.open(str(path)) as container:  # pass 2: decode, keep the sampled frames
            for t, frame in enumerate(container.decode(video=0)):
                last = frame
                if t in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
        if total and last is not None and len(frames) < len(keep):  # fewer decoded frames than packets
            frames.append(last.to_ndarray(format="rgb24"))
    except av.FFmpegError as exc:
        raise VideoError(f"cannot decode video file {path.name}: it is not a readable video "
                         f"({', '.join(s.lstrip('.') for s in VIDEO_SUFFIXES)})") from exc
    return _same_size(frames, path.name, limits)


def encode_animation(frames: Sequence[Union[Image.Image, np.ndarray]], fmt: str = "gif", fps: float = 4.0) -> bytes:
    """Frames -> the bytes of an animation: ``"gif"``, ``"png"`` (APNG), ``"webp"`` or ``"mp4"`` (H.264)."""
    pics = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    if not pics:
        raise VideoError("cannot write a video of zero frames")
    fmt = fmt.lower().lstrip(".")
    buf = io.BytesIO()
    if fmt == "mp4":
        _write_mp4(pics, buf, fps)
    elif fmt in ("gif", "png", "apng", "webp"):
        pics = [p.convert("RGB") for p in pics]
        pics[0].save(buf, format="PNG" if fmt == "apng" else fmt.upper(), save_all=True, append_images=pics[1:],
                     duration=int(1000 / fps), loop=0)
    else:
        raise ConfigError(f"unknown animation format {fmt!r}; use gif, png, webp or mp4")
    return buf.getvalue()


def _write_mp4(pics: list[Image.Image], buf: io.BytesIO, fps: float) -> None:
    import av
    from fractions import Fraction

    w, h = pics[0].size
    w2, h2 = w + w % 2, h + h % 2  # yuv420p needs even sides
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
        for pic in pics:
            canvas = Image.new("RGB", (w2, h2))
            canvas.paste(pic.convert("RGB"))
            container.mux(stream.encode(av.VideoFrame.from_image(canvas)))
        container.mux(stream.encode())
