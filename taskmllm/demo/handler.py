"""The demo's request handler: raw Gradio payloads -> a Pipeline call (shared with concurrent requests of the same
settings, :mod:`taskmllm.demo.batching`) -> the page's outputs.

It holds no model logic: files are decoded by :mod:`taskmllm.data.media` (through :mod:`taskmllm.predict`,
shared with ``taskmllm predict``), the answer comes from :class:`~taskmllm.router.pipeline.Pipeline`, and
the overlay from :meth:`Result.draw`. The project's typed errors become ``gr.Error`` with the same message,
so bad input shows a readable message in the page and the server keeps serving; any other exception becomes an
"internal error" message naming it (its traceback goes to the server's log), never gradio's bare "Error".
"""

from __future__ import annotations

import hashlib
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
from taskmllm.demo.batching import RequestBatcher, batch_key
from taskmllm.errors import ConfigError, ImageError, InputError, PromptTooLongError, TaskMLLMError, VideoError
from taskmllm.predict import (GenerationSettings, check_instruction, load_visual, make_intervention,
                              render_attention, render_overlay)

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
        concurrency_limit: requests in the handler at once (decoding uploads, waiting for and sharing a model
            call, drawing); model calls themselves run one at a time.
        max_queue: requests waiting in the queue before new ones are turned away.
        title: page title.
        max_batch_size: the most concurrent requests answered by one batched Pipeline call (1: one call per
            request); only requests with the same generation settings and intervention share a call, never
            sampled ones. A batch holds at most ``concurrency_limit`` requests (the others wait in Gradio's queue).
        batch_wait_s: how long a request arriving at an idle model waits for others to join its batch.
        compile: decode requests without an intervention through the compiled step (``compile=True``: on a CPU
            smol in bf16 decodes ~2x as fast); the first answer of each batch size waits for its compile.
    """

    limits: MediaLimits = field(default_factory=lambda: MediaLimits(max_file_mb=20.0, max_video_seconds=60.0))
    concurrency_limit: int = 8
    max_queue: int = 64
    title: str = "taskmllm"
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    compile: bool = False


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


@dataclass(frozen=True)
class _Request:
    """A checked, decoded request waiting for its model call."""

    visual: Any
    turns: list
    text: str
    hook: Any
    settings: GenerationSettings


class DemoHandler:
    """Answers demo requests with one :class:`Pipeline`; model calls are serialized by a per-handler lock
    (interventions attach hooks to the shared model, so two calls must not overlap), and concurrent requests with
    the same settings share one batched call (:class:`~taskmllm.demo.batching.RequestBatcher`)."""

    def __init__(self, pipeline: "Pipeline", options: DemoOptions = DemoOptions()) -> None:
        import tempfile

        self.pipeline = pipeline
        self.options = options
        self._tmp = tempfile.TemporaryDirectory(prefix="taskmllm-demo-")  # removed with the handler
        self._lock = threading.Lock()
        self._files: deque[Path] = deque()
        self._files_lock = threading.Lock()
        self._batcher = RequestBatcher(self._run_batch, min(options.max_batch_size, options.concurrency_limit),
                                       options.batch_wait_s)

    @property
    def num_frames(self) -> int:
        return self.pipeline.model.mllm.config.max_frames

    @property
    def hidden_size(self) -> int:
        return self.pipeline.model.mllm.hidden_size

    def initial_settings(self) -> dict[str, float]:
        """The controls' starting values: each intervention's settings for this model (calibrated when it carries
        them, else the defaults), so an untouched control runs the calibrated intervention."""
        vhr, var, zt = (self.pipeline.intervention(n) for n in ("vhr", "var", "zerotuning"))
        return {"vhr_alpha": vhr.alpha, "var_p": var.p, "var_rho": var.rho, "var_tau": var.tau, "zt_gamma": zt.gamma}

    def make_hook(self, intervention: Optional[str], vhr_alpha: Optional[float] = None, var_p: Optional[float] = None,
                  var_rho: Optional[float] = None, var_tau: Optional[float] = None, zt_gamma: Optional[float] = None):
        """The request's intervention: the named one with the model's calibrated settings, the page's controls of
        that intervention replacing single settings (a ZeroTuning calibrated per head keeps its gammas)."""
        def num(x: Optional[float], name: str) -> Optional[float]:
            return None if x is None else _number(x, name)

        per_head = (self.pipeline.calibration.get("zerotuning") or {}).get("gammas") is not None
        controls = {"vhr": {"alpha": num(vhr_alpha, "VHR alpha")},
                    "var": {"p": num(var_p, "VAR p"), "rho": num(var_rho, "VAR rho"), "tau": num(var_tau, "VAR tau")},
                    "zerotuning": {"gamma": None if per_head else num(zt_gamma, "ZeroTuning gamma")}}
        return make_intervention(intervention, self.pipeline, **controls.get(str(intervention or "none").lower(), {}))

    def answer(self, image: Any, video: Any, instruction: Optional[str], history: Optional[list],
               intervention: str = "none", vhr_alpha: Optional[float] = None, var_p: Optional[float] = None,
               var_rho: Optional[float] = None, var_tau: Optional[float] = None, max_new_tokens: int = 64,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               score_threshold: float = 0.5, zt_gamma: Optional[float] = None, attention: bool = False,
               repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0
               ) -> tuple[list, Optional[str], dict, str, str, Optional[str], list]:
        """One request -> ``(chat messages, overlay file, structured answer, raw transcript, latency, attention
        file, history)``. Intervention settings left None are the model's calibrated ones (else the defaults);
        ``attention`` adds a PNG of where the answer looked, with and without the intervention.

        Raises:
            gr.Error: the request's input or settings are unusable; its message names the problem.
        """
        try:
            hook = self.make_hook(intervention, vhr_alpha, var_p, var_rho, var_tau, zt_gamma)
            repetition = (_number(repetition_penalty, "repetition penalty"),
                          _number(no_repeat_ngram_size or 0, "no-repeat n-gram size", int))
            return self._answer(image, video, instruction, list(history or []), intervention, hook, max_new_tokens,
                                do_sample, temperature, top_p, seed, score_threshold, bool(attention), repetition)
        except TaskMLLMError as exc:
            title = "Bad input" if isinstance(exc, InputError) else "Cannot answer"
            raise gr.Error(str(exc), title=title, print_exception=False) from exc
        except Exception as exc:  # noqa: BLE001 - a bug must not show gradio's bare "Error": say what, log where
            log.exception("unexpected error answering a demo request")
            raise gr.Error(f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); the server "
                           "log has the traceback", title="Internal error", print_exception=False) from exc

    def _answer(self, image, video, instruction, history, intervention, hook, max_new_tokens, do_sample,
                temperature, top_p, seed, score_threshold, attention, repetition=(1.0, 0)):
        start = time.perf_counter()
        text = check_instruction(instruction)
        image_path = _path(image, "image", ImageError)
        video_source = _video_source(_paths(video))
        visual = load_visual(image_path, video_source, self.num_frames, self.options.limits)
        settings = GenerationSettings(_number(max_new_tokens, "max new tokens", int), bool(do_sample),
                                      _number(temperature, "temperature"), _number(top_p, "top-p"),
                                      _number(seed or 0, "seed", int), *repetition)
        score_threshold = _number(score_threshold, "box score threshold")
        settings.kwargs()  # a bad setting is named here, before the request waits for a model call
        decoded = time.perf_counter()
        looked = looked_file = None
        key = _visual_key(image_path, video_source)
        result, batch_size = self._batcher.submit(batch_key(hook, settings),
                                                  _Request(visual, _turns(history, key), text, hook, settings))
        answered = time.perf_counter()
        if attention and visual is not None:
            with self._lock:
                data, looked = render_attention(self.pipeline, visual, text, hook, settings.max_new_tokens)
            looked_file = self._keep(data, "attention", "png")
        overlay = None
        if result.image is not None or result.frames:
            overlay = self._write_overlay(result, score_threshold)
        total = time.perf_counter() - start
        record = {"instruction": text, "intervention": "none" if hook is None else repr(hook),
                  "intervention_settings": self.pipeline.intervention_source(intervention), **result.to_dict(),
                  "attention": looked, "batch_size": batch_size}
        latency = {"decode_input": decoded - start, **result.timings, "model_total": answered - decoded,
                   "render": time.perf_counter() - answered, "total": total}
        record["latency"] = {k: round(v, 4) for k, v in latency.items()}
        visual_note = "" if visual is None else f" [{'video' if video_source else 'image'}]"
        history = (history + [{"role": "user", "content": text + visual_note, "prompt": text, "visual": key},
                              {"role": "assistant", "content": result.text or "(empty answer)",
                               "raw": result.raw_text}])
        history = history[-MAX_HISTORY_MESSAGES:]
        chat = [{"role": m["role"], "content": m["content"]} for m in history]
        return chat, overlay, record, result.raw_text, _latency_markdown(latency), looked_file, history

    def _run_batch(self, requests: list[_Request]) -> list[Any]:
        """One outcome per request (``(result, batch size)`` or its exception): one batched call for several
        requests (their settings and intervention are the same: :func:`batch_key`); when it fails (e.g. one
        conversation too long for the model), each request alone, with its own answer or error."""
        with self._lock:
            if len(requests) > 1:
                first = requests[0]
                conversations = [_messages(r.turns, r.text) for r in requests]
                try:
                    results = self.pipeline.chat_batch([r.visual for r in requests], conversations,
                                                       intervention=first.hook,
                                                       **self._generation(first.hook, first.settings))
                    return [(result, len(requests)) for result in results]
                except TaskMLLMError:
                    pass
            outcomes: list[Any] = []
            for r in requests:
                try:
                    outcomes.append((self._reply(r.visual, r.turns, r.text, r.hook, r.settings), 1))
                except Exception as exc:  # noqa: BLE001 - raised in the request's own thread (see answer)
                    outcomes.append(exc)
            return outcomes

    def _reply(self, visual: Any, turns: list[tuple[str, str]], text: str, hook: Any,
               settings: GenerationSettings) -> "Result":
        """The answer to ``text`` after the earlier ``turns`` about the same picture; the oldest turns are left out
        while the conversation is too long for the model."""
        while True:
            try:
                return self.pipeline.chat(visual, _messages(turns, text), intervention=hook,
                                          **self._generation(hook, settings))
            except PromptTooLongError:
                if not turns:
                    raise
                turns = turns[1:]

    def _generation(self, hook: Any, settings: GenerationSettings) -> dict[str, Any]:
        """The generation options of a call: the request's settings, and the compiled step when the demo runs with
        it and the request has no intervention (interventions run in the default decoder)."""
        return {**settings.kwargs(), **({"compile": True} if self.options.compile and hook is None else {})}

    def _write_overlay(self, result: "Result", score_threshold: float) -> str:
        """The overlay as a temporary file (PNG for an image, animated GIF for a video)."""
        data, fmt = render_overlay(result, "gif" if result.frames else "png", score_threshold=score_threshold)
        return self._keep(data, "overlay", fmt)

    def _keep(self, data: bytes, kind: str, fmt: str) -> str:
        """``data`` as a temporary file; Gradio copies it into its cache when it sends the answer, so only the last
        :data:`KEEP_FILES` are kept here."""
        import uuid

        path = Path(self._tmp.name) / f"{kind}-{uuid.uuid4().hex[:12]}.{fmt}"
        path.write_bytes(data)
        with self._files_lock:
            self._files.append(path)
            while len(self._files) > KEEP_FILES:
                self._files.popleft().unlink(missing_ok=True)
        return str(path)


def _visual_key(image: Optional[str], video: Union[str, list[str], None]) -> str:
    """A digest of the request's picture files' contents ("" for none): turns about another picture are not sent."""
    digest = hashlib.sha256()
    for f in [image] if image else [video] if isinstance(video, str) else list(video or []):
        digest.update(Path(f).read_bytes())
    return digest.hexdigest() if image or video else ""


def _turns(history: list, key: str) -> list[tuple[str, str]]:
    """The ``(question, model transcript)`` turns of the chat since its picture was last ``key`` (the trailing
    turns about this picture; messages without the model's record, e.g. from an older page, end the run)."""
    turns: list[tuple[str, str]] = []
    for user, reply in zip(history[-2::-2], history[::-2]):
        if not (isinstance(user, dict) and isinstance(reply, dict) and user.get("visual") == key
                and isinstance(user.get("prompt"), str) and isinstance(reply.get("raw"), str)):
            break
        turns.insert(0, (user["prompt"], reply["raw"]))
    return turns


def _messages(turns: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    """The chat messages of the earlier ``(question, transcript)`` turns and the new question."""
    return [m for q, a in turns for m in (("user", q), ("assistant", a))] + [("user", text)]


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
