"""One request end to end: files + instruction -> :class:`~taskmllm.router.result.Result` -> overlay and JSON.

``taskmllm predict`` calls :func:`predict`; the Gradio demo uses the same pieces (:func:`load_visual`,
:func:`check_instruction`, :func:`make_intervention`, :class:`GenerationSettings`, :func:`render_overlay`)
so a file, an instruction and settings give the same answer in both::

    taskmllm predict --image photo.png "Segment the red circle." --out overlay.png --json result.json
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from taskmllm.data.media import MediaLimits, encode_animation, read_image, read_video
from taskmllm.errors import ConfigError, InputError
from taskmllm.model.io import atomic_write_bytes, check_output_file

if TYPE_CHECKING:
    from taskmllm.router.pipeline import Pipeline
    from taskmllm.router.result import Result

PathLike = Union[str, Path]
INTERVENTIONS = ("none", "vhr", "var")
MAX_INSTRUCTION_CHARS = 2000


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one request: greedy unless ``do_sample``; ``seed`` makes sampling repeatable."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Pipeline.__call__``.

        Raises:
            ConfigError: a setting out of range.
        """
        import torch

        from taskmllm.model.generation import check_generation

        out = check_generation({"max_new_tokens": self.max_new_tokens})
        if out["max_new_tokens"] > 4096:
            raise ConfigError(f"max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        if self.do_sample:
            seed = self.seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
            out.update(check_generation({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}))
            out["generator"] = torch.Generator().manual_seed(seed)
        return out


def default_var_tau(hidden_size: int) -> float:
    """VAR's sink threshold for a model: the published 20, capped at half of ``sqrt(hidden_size)``."""
    return min(20.0, 0.5 * math.sqrt(hidden_size))


def make_intervention(name: Optional[str], hidden_size: int, *, alpha: float = 2.0, p: float = 0.6,
                      rho: float = 0.5, tau: Optional[float] = None):
    """``"none"``/None -> None, ``"vhr"`` -> ``VHR(alpha)``, ``"var"`` -> ``VAR(p, rho, tau)``.

    Raises:
        ConfigError: an unknown name or an out-of-range setting (``tau`` must be < ``sqrt(hidden_size)``).
    """
    key = (name or "none").lower()
    if key == "none":
        return None
    from taskmllm.model.interventions import VAR, VHR

    if key == "vhr":
        return VHR(alpha=alpha)
    if key == "var":
        tau = default_var_tau(hidden_size) if tau is None else float(tau)
        if not 0 < tau < math.sqrt(hidden_size):
            raise ConfigError(f"VAR tau must be in (0, sqrt(hidden size) = {math.sqrt(hidden_size):.2f}), got {tau}")
        return VAR(p=p, rho=rho, tau=tau)
    raise ConfigError(f"unknown intervention {name!r}; known: {INTERVENTIONS}")


def check_instruction(text: Optional[str]) -> str:
    """The instruction, stripped.

    Raises:
        InputError: not a string of valid Unicode, empty, or longer than :data:`MAX_INSTRUCTION_CHARS`.
    """
    from taskmllm.model.processor import check_text

    text = check_text("" if text is None else text, "instruction").strip()
    if not text:
        raise InputError("the instruction is empty: type a question or a task, e.g. 'Segment the red circle.'")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"the instruction has {len(text)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
    return text


def load_visual(image: Optional[PathLike] = None, video: Union[PathLike, Sequence[PathLike], None] = None,
                num_frames: int = 8, limits: MediaLimits = MediaLimits()) -> Union[np.ndarray, list, None]:
    """The Pipeline input for an image file, a video (file, frame folder or list of frame files), or neither.

    Raises:
        InputError: both an image and a video; ImageError / VideoError: see :mod:`taskmllm.data.media`.
    """
    has_video = video is not None and not (isinstance(video, (list, tuple)) and not video)
    if image is not None and has_video:
        raise InputError("give an image or a video, not both")
    if image is not None:
        return read_image(image, limits)
    if has_video:
        return read_video(video, num_frames, limits)
    return None


def render_overlay(result: "Result", fmt: str = "png", fps: float = 4.0,
                   score_threshold: float = 0.5) -> tuple[bytes, str]:
    """The result drawn on its picture, encoded: ``(bytes, suffix)``.

    An image gives a still in ``fmt`` (png, jpg, webp); a video an animation (``fmt`` gif, png (APNG), webp
    or mp4; a still format other than png becomes gif). Boxes scoring below ``score_threshold`` are not drawn.
    Raises :class:`InputError` for a text-only result.
    """
    import io

    fmt = fmt.lower().lstrip(".")
    if result.image is None and not result.frames:
        raise InputError("a text-only answer has no picture to draw an overlay on")
    drawn = result.draw(score_threshold=score_threshold)
    if isinstance(drawn, list):
        fmt = fmt if fmt in ("gif", "png", "webp", "mp4") else "gif"
        return encode_animation(drawn, fmt, fps=fps), fmt
    buf = io.BytesIO()
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper())
    try:
        drawn.save(buf, format=pil_format)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"cannot write an overlay as {fmt!r}: {exc}") from exc
    return buf.getvalue(), fmt


@dataclass
class Prediction:
    """What :func:`predict` produced: the result, its JSON-ready dict and the files written."""

    result: "Result"
    record: dict[str, Any]
    overlay_path: Optional[Path] = None
    json_path: Optional[Path] = None


def predict(model: Union[str, Path, "Pipeline"], instruction: str, image: Optional[PathLike] = None,
            video: Optional[PathLike] = None, out: Optional[PathLike] = None, json_path: Optional[PathLike] = None,
            intervention: Optional[str] = None, settings: GenerationSettings = GenerationSettings(),
            limits: MediaLimits = MediaLimits(), device: str = "cpu") -> Prediction:
    """Answer ``instruction`` about an image/video file with a checkpoint (a directory, ``"tiny"`` or a loaded
    ``Pipeline``); write the overlay to ``out`` (format from its suffix) and the JSON record to ``json_path``.

    The record is ``Result.to_dict()`` (masks as COCO RLE, boxes in pixels, timings) plus ``instruction``,
    ``input``, ``intervention`` and ``overlay``.
    """
    from taskmllm.router.pipeline import Pipeline

    instruction = check_instruction(instruction)
    for path in (out, json_path):  # before any compute: an answer is never lost to an unwritable path
        if path is not None:
            check_output_file(path, "predict --out")
    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model, device=device)
    visual = load_visual(image, video, pipe.model.mllm.config.max_frames, limits)
    hook = make_intervention(intervention, pipe.model.mllm.hidden_size)
    result = pipe(visual, instruction, intervention=hook, **settings.kwargs())
    overlay_path = None
    if out is not None and (result.image is not None or result.frames):
        data, _ = render_overlay(result, Path(out).suffix or "png")
        overlay_path = atomic_write_bytes(out, data)
    record = {"instruction": instruction, "input": str(image or video or ""),
              "intervention": "none" if hook is None else repr(hook), **result.to_dict(),
              "overlay": None if overlay_path is None else str(overlay_path)}
    written = None
    if json_path is not None:
        written = atomic_write_bytes(json_path, (json.dumps(record, indent=2) + "\n").encode())
    return Prediction(result, record, overlay_path, written)
