"""One request end to end: files + instruction -> :class:`~taskmllm.router.result.Result` -> overlay and JSON.

``taskmllm predict`` calls :func:`predict`; the Gradio demo uses the same pieces (:func:`load_visual`,
:func:`check_instruction`, :func:`make_intervention`, :class:`GenerationSettings`, :func:`render_overlay`,
:func:`render_attention`) so a file, an instruction and settings give the same answer in both::

    taskmllm predict --image photo.png "Segment the red circle." --out overlay.png --json result.json
    taskmllm predict --image photo.png "Is there a dog?" --intervention vhr --attention looked.png

Several requests run as one batched ``Pipeline`` call: ``predict(model, [instr, ...], image=[path, None, ...],
video=[None, None, ...])``, or from a JSON-lines file with ``taskmllm predict --requests FILE.jsonl --out-dir DIR``
(:mod:`taskmllm.predict_requests`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from taskmllm.data.media import MediaLimits, encode_animation, read_image, read_video
from taskmllm.errors import ConfigError, InputError
from taskmllm.model.io import atomic_write_bytes, check_output_file

if TYPE_CHECKING:
    from taskmllm.model.generation import Intervention
    from taskmllm.router.pipeline import Pipeline
    from taskmllm.router.result import Result

PathLike = Union[str, Path]
INTERVENTIONS = ("none", "vhr", "var", "zerotuning")  # = taskmllm.model.interventions.calibrated.NAMES (a test checks)
MAX_INSTRUCTION_CHARS = 2000


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one request: greedy unless ``do_sample``; ``seed`` makes sampling repeatable;
    ``repetition_penalty`` (1.0 = off) and ``no_repeat_ngram_size`` (0 = off) are transformers' logits processors
    (:func:`taskmllm.model.generation.generate`)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Pipeline.__call__``.

        Raises:
            ConfigError: a setting out of range.
        """
        import torch

        from taskmllm.model.generation import check_generation

        out = check_generation({"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                                "no_repeat_ngram_size": self.no_repeat_ngram_size})
        if out["max_new_tokens"] > 4096:
            raise ConfigError(f"max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        if self.do_sample:
            seed = self.seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
            out.update(check_generation({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}))
            out["generator"] = torch.Generator().manual_seed(seed)
        return out


def make_intervention(name: Optional[str], pipeline: "Pipeline", **overrides: Optional[float]
                      ) -> Optional["Intervention"]:
    """The intervention the CLI, ``eval`` and the demo run for ``name`` (``"none"``/None, ``"vhr"``, ``"var"``,
    ``"zerotuning"``): the model's calibrated settings when it carries them (``interventions.json``), else the
    method's defaults (VAR: its mode's default ``p``, ``tau`` per model), with single settings replaced by
    ``overrides`` (``alpha=``, ``p=``, ``rho=``, ``tau=``, ``gamma=``; None = keep). See
    :meth:`Pipeline.intervention <taskmllm.router.pipeline.Pipeline.intervention>`.

    Raises:
        ConfigError: an unknown name or an out-of-range setting (VAR's ``tau`` must be < sqrt(hidden size)).
    """
    return pipeline.intervention(name, **overrides)


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


def render_attention(pipe: "Pipeline", visual: Any, instruction: str, intervention: Optional["Intervention"],
                     max_new_tokens: int = 16) -> tuple[bytes, dict[str, Any]]:
    """Where the answer looked (:mod:`taskmllm.attention_overlay`), with and without ``intervention``, as PNG bytes
    and a JSON-able summary (heads averaged; per panel the answer and its attention mass on the picture).

    Raises:
        InputError: a text-only request.
    """
    import io

    from taskmllm.attention_overlay import attention_view

    view = attention_view(pipe, visual, instruction, intervention, max_new_tokens)
    buf = io.BytesIO()
    view.render().save(buf, format="PNG")
    return buf.getvalue(), view.summary()


@dataclass
class Prediction:
    """What :func:`predict` produced: the result, its JSON-ready dict and the files written."""

    result: "Result"
    record: dict[str, Any]
    overlay_path: Optional[Path] = None
    json_path: Optional[Path] = None
    attention_path: Optional[Path] = None


def predict(model: Union[str, Path, "Pipeline"], instruction: Union[str, Sequence[str]],
            image: Union[PathLike, Sequence[Optional[PathLike]], None] = None,
            video: Union[PathLike, Sequence[Optional[PathLike]], None] = None,
            out: Union[PathLike, Sequence[Optional[PathLike]], None] = None,
            json_path: Union[PathLike, Sequence[Optional[PathLike]], None] = None,
            intervention: Optional[str] = None, settings: GenerationSettings = GenerationSettings(),
            limits: MediaLimits = MediaLimits(), device: str = "cpu",
            attention: Union[PathLike, Sequence[Optional[PathLike]], None] = None
            ) -> Union[Prediction, list[Prediction]]:
    """Answer ``instruction`` about an image/video file with a checkpoint (a directory, ``"tiny"`` or a loaded
    ``Pipeline``); write the overlay to ``out`` (format from its suffix) and the JSON record to ``json_path``;
    with ``attention``, write there a PNG of where the answer looked, with and without the intervention.

    Several requests: ``instruction`` a list of n instructions, and ``image``, ``video``, ``out``, ``json_path``
    and ``attention`` each None or a list of n (None where a request has none). The n requests are answered by
    **one** batched ``Pipeline`` call (its generation and every expert call batched) and a list of n
    :class:`Prediction` is returned; a greedy answer is the same as the request's own call (tested). Every
    request is checked and decoded before any compute; an error names the request (``request 3: ...``, 1-based).

    ``intervention`` is a name (:func:`make_intervention`: the model's calibrated settings, else the defaults).
    The record is ``Result.to_dict()`` (masks as COCO RLE, boxes in pixels, timings) plus ``instruction``,
    ``input``, ``intervention`` (the object's repr), ``intervention_settings`` (``"calibrated"``,
    ``"defaults"`` or None), ``overlay`` and ``attention`` (path, heads, answers and attention on the picture).
    """
    if isinstance(instruction, str):
        return predict_batch(model, [BatchRequest(instruction, image, video, out, json_path, attention)],
                             intervention, settings, limits, device, labels=None)[0]
    if not isinstance(instruction, (list, tuple)) or not instruction:
        raise InputError(f"instruction must be a string or a non-empty list of strings, got {instruction!r:.80}")
    n = len(instruction)
    columns = [_column(value, n, name) for name, value in
               (("image", image), ("video", video), ("out", out), ("json_path", json_path), ("attention", attention))]
    requests = [BatchRequest(text, *row) for text, *row in zip(instruction, *columns)]
    return predict_batch(model, requests, intervention, settings, limits, device,
                         labels=[f"request {i + 1}" for i in range(n)])


@dataclass(frozen=True)
class BatchRequest:
    """One request of :func:`predict_batch`: the instruction, its image or video file, and the files to write."""

    instruction: str
    image: Optional[PathLike] = None
    video: Optional[PathLike] = None
    out: Optional[PathLike] = None
    json_path: Optional[PathLike] = None
    attention: Optional[PathLike] = None


def predict_batch(model: Union[str, Path, "Pipeline"], requests: Sequence[BatchRequest],
                  intervention: Optional[str] = None, settings: GenerationSettings = GenerationSettings(),
                  limits: MediaLimits = MediaLimits(), device: str = "cpu",
                  labels: Optional[Sequence[str]] = None) -> list[Prediction]:
    """:func:`predict` of several requests as one batched ``Pipeline`` call; ``labels[i]`` prefixes the message of
    an error about request ``i`` (e.g. ``"requests.jsonl line 3"``; None: the message as it is).

    Raises:
        InputError (or its ImageError / VideoError): a bad instruction or picture, naming the request;
        ConfigError: an unwritable output path, a bad setting.
    """
    from taskmllm.router.pipeline import Pipeline

    def named(i: int, check, *args):
        if labels is None:
            return check(*args)
        try:
            return check(*args)
        except (InputError, ConfigError) as exc:  # the same type, its message naming the request
            raise type(exc)(f"{labels[i]}: {exc}") from exc

    texts = [named(i, check_instruction, r.instruction) for i, r in enumerate(requests)]
    for i, r in enumerate(requests):
        for flag, path in (("--out", r.out), ("--json", r.json_path), ("--attention", r.attention)):
            if path is not None:  # before any compute: an answer is never lost to an unwritable path
                named(i, check_output_file, path, f"predict {flag}")
    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model, device=device)
    frames = pipe.model.mllm.config.max_frames
    visuals = [named(i, load_visual, r.image, r.video, frames, limits) for i, r in enumerate(requests)]
    for i, (r, visual) in enumerate(zip(requests, visuals)):
        if r.attention is not None and visual is None:
            named(i, _no_picture)
    hook = make_intervention(intervention, pipe)
    results = pipe(visuals, texts, intervention=hook, **settings.kwargs())
    return [_finish(pipe, r, text, visual, result, hook, intervention, settings)
            for r, text, visual, result in zip(requests, texts, visuals, results)]


def write_record(path: PathLike, record: dict) -> Path:
    """``record`` as indented JSON at ``path`` (its folder made if missing), written atomically; the path written."""
    return atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def _no_picture() -> None:
    raise InputError("--attention needs an image or a video: a text-only answer looks at no picture")


def _column(value: Any, n: int, name: str) -> list:
    """A per-request argument of a list call: None (n Nones) or a list of n entries."""
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise InputError(f"{n} instructions need {name} as None or a list of {n} (None where a request has none), "
                         f"got {value!r:.80}")
    return list(value)


def _finish(pipe: "Pipeline", request: BatchRequest, instruction: str, visual: Any, result: "Result",
            hook: Optional["Intervention"], intervention: Optional[str], settings: GenerationSettings) -> Prediction:
    """One request's files (overlay, attention PNG, JSON record) from its result."""
    overlay_path = attention_path = None
    out = request.out
    if out is not None and (result.image is not None or result.frames):
        overlay_path = atomic_write_bytes(out, render_overlay(result, Path(out).suffix or "png")[0])
    looked = None
    if request.attention is not None:
        data, looked = render_attention(pipe, visual, instruction, hook, settings.max_new_tokens)
        attention_path = atomic_write_bytes(request.attention, data)
        looked = {"path": str(attention_path), **looked}
    record = {"instruction": instruction, "input": str(request.image or request.video or ""),
              "intervention": "none" if hook is None else repr(hook),
              "intervention_settings": pipe.intervention_source(intervention),
              **result.to_dict(), "overlay": None if overlay_path is None else str(overlay_path),
              "attention": looked}
    written = None
    if request.json_path is not None:
        written = write_record(request.json_path, record)
    return Prediction(result, record, overlay_path, written, attention_path)
