"""The demo's request handler: raw Gradio payloads -> one Pipeline call -> the page's outputs.

It holds no model logic: files are decoded by :mod:`taskmllm.data.media` (through :mod:`taskmllm.predict`,
shared with ``taskmllm predict``), the answer comes from :class:`~taskmllm.router.pipeline.Pipeline`, and
the overlay from :meth:`Result.draw`. The project's typed errors become ``gr.Error`` with the same message,
so bad input shows a readable message in the page and the server keeps serving; any other exception becomes an
"internal error" message naming it (its traceback goes to the server's log), never gradio's bare "Error".
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import gradio as gr

from taskmllm.data.media import MediaLimits
from taskmllm.errors import ConfigError, ImageError, InputError, TaskMLLMError, VideoError
from taskmllm.predict import (GenerationSettings, check_instruction, load_visual, make_intervention,
                              render_overlay)

if TYPE_CHECKING:
    from taskmllm.router.pipeline import Pipeline
    from taskmllm.router.result import Result

log = logging.getLogger(__name__)
MAX_HISTORY_MESSAGES = 40
KEEP_FILES = 256


@dataclass(frozen=True)
class DemoOptions:
    """Serving settings of the demo.

    Attributes:
        limits: per-request media limits (file size, video length, minimum image side).
        concurrency_limit: requests processed at once (model calls themselves run one at a time).
        max_queue: requests waiting in the queue before new ones are turned away.
        title: page title.
    """

    limits: MediaLimits = field(default_factory=lambda: MediaLimits(max_file_mb=20.0, max_video_seconds=60.0))
    concurrency_limit: int = 2
    max_queue: int = 64
    title: str = "taskmllm"


def _path(payload: Any, what: str, error: type) -> Optional[str]:
    """The local file of an uploaded Gradio file payload (a FileData dict or a path string)."""
    if payload is None:
        return None
    if isinstance(payload, (str, Path)):
        return str(payload)
    if isinstance(payload, dict) and payload.get("path"):
        return str(payload["path"])
    raise error(f"the uploaded {what} could not be read (no file in the upload)")


def _paths(payload: Any) -> list[str]:
    if payload is None:
        return []
    items = payload if isinstance(payload, (list, tuple)) else [payload]
    return [p for p in (_path(item, "video", VideoError) for item in items) if p is not None]


def _video_source(files: Sequence[str]) -> Union[str, list[str], None]:
    """One uploaded file is a video file; several are the frames of a video, in name order."""
    if not files:
        return None
    if len(files) == 1:
        return files[0]
    return sorted(files, key=lambda f: Path(f).name)


class DemoHandler:
    """Answers demo requests with one :class:`Pipeline`; model calls are serialized by a per-handler lock
    (interventions attach hooks to the shared model, so two calls must not overlap)."""

    def __init__(self, pipeline: "Pipeline", options: DemoOptions = DemoOptions()) -> None:
        import tempfile

        self.pipeline = pipeline
        self.options = options
        self._tmp = tempfile.TemporaryDirectory(prefix="taskmllm-demo-")  # removed with the handler
        self._lock = threading.Lock()
        self._files: deque[Path] = deque()
        self._files_lock = threading.Lock()

    @property
    def num_frames(self) -> int:
        return self.pipeline.model.mllm.config.max_frames

    @property
    def hidden_size(self) -> int:
        return self.pipeline.model.mllm.hidden_size

    def answer(self, image: Any, video: Any, instruction: Optional[str], history: Optional[list],
               intervention: str = "none", vhr_alpha: float = 2.0, var_p: float = 0.6, var_rho: float = 0.5,
               var_tau: Optional[float] = None, max_new_tokens: int = 64, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, score_threshold: float = 0.5
               ) -> tuple[list, Optional[str], dict, str, str, list]:
        """One request -> ``(chat messages, overlay file, structured answer, raw transcript, latency, history)``.

        Raises:
            gr.Error: the request's input or settings are unusable; its message names the problem.
        """
        try:
            return self._answer(image, video, instruction, list(history or []), intervention, vhr_alpha, var_p,
                                var_rho, var_tau, max_new_tokens, do_sample, temperature, top_p, seed,
                                score_threshold)
        except TaskMLLMError as exc:
            title = "Bad input" if isinstance(exc, InputError) else "Cannot answer"
            raise gr.Error(str(exc), title=title, print_exception=False) from exc
        except Exception as exc:  # noqa: BLE001 - a bug must not show gradio's bare "Error": say what, log where
            log.exception("unexpected error answering a demo request")
            raise gr.Error(f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); the server "
                           "log has the traceback", title="Internal error", print_exception=False) from exc

    def _answer(self, image, video, instruction, history, intervention, vhr_alpha, var_p, var_rho, var_tau,
                max_new_tokens, do_sample, temperature, top_p, seed, score_threshold):
        start = time.perf_counter()
        text = check_instruction(instruction)
        image_path = _path(image, "image", ImageError)
        video_source = _video_source(_paths(video))
        visual = load_visual(image_path, video_source, self.num_frames, self.options.limits)
        hook = make_intervention(intervention, self.hidden_size, alpha=_number(vhr_alpha, "VHR alpha"),
                                 p=_number(var_p, "VAR p"), rho=_number(var_rho, "VAR rho"),
                                 tau=None if var_tau is None else _number(var_tau, "VAR tau"))
        settings = GenerationSettings(_number(max_new_tokens, "max new tokens", int), bool(do_sample),
                                      _number(temperature, "temperature"), _number(top_p, "top-p"),
                                      _number(seed or 0, "seed", int))
        score_threshold = _number(score_threshold, "box score threshold")
        decoded = time.perf_counter()
        with self._lock:
            result = self.pipeline(visual, text, intervention=hook, **settings.kwargs())
        answered = time.perf_counter()
        overlay = None
        if result.image is not None or result.frames:
            overlay = self._write_overlay(result, score_threshold)
        total = time.perf_counter() - start
        record = {"instruction": text, "intervention": "none" if hook is None else repr(hook),
                  **result.to_dict()}
        latency = {"decode_input": decoded - start, **result.timings, "model_total": answered - decoded,
                   "render": time.perf_counter() - answered, "total": total}
        record["latency"] = {k: round(v, 4) for k, v in latency.items()}
        visual_note = "" if visual is None else f" [{'video' if video_source else 'image'}]"
        history = (history + [{"role": "user", "content": text + visual_note},
                              {"role": "assistant", "content": result.text or "(empty answer)"}])
        history = history[-MAX_HISTORY_MESSAGES:]
        return history, overlay, record, result.raw_text, _latency_markdown(latency), history

    def _write_overlay(self, result: "Result", score_threshold: float) -> str:
        """The overlay as a temporary file (PNG for an image, animated GIF for a video); Gradio copies it into
        its cache when it sends the answer, so only the last :data:`KEEP_FILES` are kept here."""
        import uuid

        data, fmt = render_overlay(result, "gif" if result.frames else "png", score_threshold=score_threshold)
        path = Path(self._tmp.name) / f"overlay-{uuid.uuid4().hex[:12]}.{fmt}"
        path.write_bytes(data)
        with self._files_lock:
            self._files.append(path)
            while len(self._files) > KEEP_FILES:
                self._files.popleft().unlink(missing_ok=True)
        return str(path)


def _number(value: Any, name: str, kind: type = float) -> Any:
    """A setting from the page or an API client as ``kind`` (``float`` or ``int``), or :class:`ConfigError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise ConfigError(f"{name} must be a finite {'integer' if kind is int else 'number'}, got {value!r}")
    return int(number) if kind is int else number


def _latency_markdown(latency: dict[str, float]) -> str:
    parts = " · ".join(f"{k.replace('_', ' ')} {v * 1000:.0f} ms" for k, v in latency.items() if k != "total")
    return f"**Latency {latency['total']:.2f} s** — {parts}"
