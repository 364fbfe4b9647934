"""Many requests from a JSON-lines file, answered in batches: ``taskmllm predict --requests FILE.jsonl --out-dir DIR``.

Each non-blank line of the file is one request::

    {"image": "photos/dog.jpg", "prompt": "Is there a dog?"}
    {"video": "clips/run.mp4", "prompt": "Follow the runner.", "id": "runner"}
    {"prompt": "What is a circle?"}

``prompt`` is required; ``image`` or ``video`` (a file, a folder of frames or a list of frame files; not both) are
paths relative to the file's folder; ``id`` (optional) names the request's output files, by default its line
number (``0003``). For each request ``DIR`` gets ``ID.json`` (the record of :func:`taskmllm.predict.predict`, plus
``id`` and ``line``) and, when it has a picture, ``ID.png`` (an image's overlay) or ``ID.gif`` (a video's).

The whole file is checked before any compute (a malformed line, an unknown key, a missing file or a repeated id
is an :class:`~taskmllm.errors.InputError` naming its line); the requests then run in file order, ``batch_size``
at a time, each batch as one batched ``Pipeline`` call (:func:`~taskmllm.predict.predict_batch`: its greedy
answers are those of one call per request). A picture that cannot be decoded stops the run with an error naming
its line; the batches before it are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from taskmllm.data.media import MediaLimits
from taskmllm.errors import ConfigError, InputError
from taskmllm.model.io import check_output_dir
from taskmllm.predict import BatchRequest, GenerationSettings, Prediction, predict_batch, write_record

if TYPE_CHECKING:
    from taskmllm.router.pipeline import Pipeline

KEYS = ("prompt", "image", "video", "id")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class FileRequest:
    """One line of a requests file: its instruction, picture (absolute paths), output name and line number."""

    prompt: str
    image: Optional[Path]
    video: Union[Path, list[Path], None]
    id: str
    line: int


def read_requests(path: Union[str, Path]) -> list[FileRequest]:
    """The requests of a JSON-lines file (blank lines skipped), every line checked.

    Raises:
        InputError: the file is missing, unreadable or has no request, or a line is not such a request — the
            message names the file and the line (``requests.jsonl line 3: ...``).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the requests file {path}: {exc}") from exc
    width = max(4, len(str(len(lines))))
    requests: list[FileRequest] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        request = _parse_line(text, path.parent, f"{number:0{width}d}", f"{path} line {number}", number)
        if request.id in seen:
            raise InputError(f"{path} line {number}: id {request.id!r} is already used by line {seen[request.id]}; "
                             "each request needs its own (it names the output files)")
        seen[request.id] = number
        requests.append(request)
    if not requests:
        raise InputError(f"{path} has no requests: write one JSON object per line, e.g. "
                         '{"image": "photo.png", "prompt": "Is there a dog?"}')
    return requests


def _parse_line(text: str, folder: Path, default_id: str, where: str, number: int) -> FileRequest:
    """One line -> a :class:`FileRequest`, or an :class:`InputError` prefixed with ``where``."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be a JSON object with a 'prompt', got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(KEYS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be a string (the instruction), got {prompt!r:.60}")
    if entry.get("image") is not None and entry.get("video") is not None:
        raise InputError(f"{where}: give an 'image' or a 'video', not both")
    image = _file(entry.get("image"), folder, where, "image")
    video = entry.get("video")
    if isinstance(video, list):
        if not video:
            raise InputError(f"{where}: 'video' is an empty list of frames")
        video = [_file(frame, folder, where, "video frame") for frame in video]
    else:
        video = _file(video, folder, where, "video")
    name = entry.get("id", default_id)
    if not isinstance(name, str) or not _ID.fullmatch(name):
        raise InputError(f"{where}: 'id' must be a file name of letters, digits, '.', '_' or '-' (at most 100, not "
                         f"starting with '.' or '-'), got {name!r:.60}")
    return FileRequest(prompt, image, video, name, number)


def _file(value: Any, folder: Path, where: str, what: str) -> Optional[Path]:
    """A request's picture path (relative to the requests file's folder), which must exist."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: the {what} must be a path string, got {value!r:.60}")
    path = folder / value
    if not path.exists():
        raise InputError(f"{where}: the {what} {value} does not exist (looked for {path})")
    return path


def predict_requests(model: Union[str, Path, "Pipeline"], requests_file: Union[str, Path],
                     out_dir: Union[str, Path, None] = None, batch_size: int = 8, intervention: Optional[str] = None,
                     settings: GenerationSettings = GenerationSettings(), limits: MediaLimits = MediaLimits(),
                     device: str = "cpu") -> Iterator[tuple[FileRequest, Prediction]]:
    """Answer every request of ``requests_file`` (see the module), ``batch_size`` per batched ``Pipeline`` call;
    with ``out_dir``, write each request's overlay and JSON record there. Yields ``(request, prediction)`` in file
    order as each batch finishes (the record has ``id`` and ``line`` added). The file, ``out_dir`` and the model
    are checked and loaded by the call itself; the batches run as the iterator is consumed.

    Raises:
        InputError: a bad line (naming it), before any compute; ConfigError: ``out_dir`` is not a writable
            folder, ``batch_size`` < 1.
    """
    from taskmllm.router.pipeline import Pipeline

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    requests = read_requests(requests_file)  # checked here, not at the first next(): before any compute
    folder = None if out_dir is None else check_output_dir(out_dir, "predict --out-dir")
    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model, device=device)
    return _answers(pipe, requests, str(requests_file), folder, batch_size, intervention, settings, limits)


def _answers(pipe: "Pipeline", requests: list[FileRequest], source: str, folder: Optional[Path], batch_size: int,
             intervention: Optional[str], settings: GenerationSettings,
             limits: MediaLimits) -> Iterator[tuple[FileRequest, Prediction]]:
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        batch = [BatchRequest(r.prompt, r.image, r.video,
                              None if folder is None else folder / f"{r.id}.{'png' if r.video is None else 'gif'}")
                 for r in chunk]
        labels = [f"{source} line {r.line}" for r in chunk]
        for request, pred in zip(chunk, predict_batch(pipe, batch, intervention, settings, limits, labels=labels)):
            pred.record = {"id": request.id, "line": request.line, **pred.record}
            if folder is not None:
                pred.json_path = write_record(folder / f"{request.id}.json", pred.record)
            yield request, pred


def print_answers(answers: Iterator[tuple[FileRequest, Prediction]], as_json: bool = False,
                  out_dir: Union[str, Path, None] = None) -> int:
    """The CLI's output of :func:`predict_requests`: per request ``ID: answer`` (``as_json``: its record as one JSON
    line) on stdout as its batch finishes, then what was written on stderr; returns the exit code 0."""
    import sys

    count = 0
    for request, pred in answers:
        print(json.dumps(pred.record) if as_json else f"{request.id}: {pred.result.text}", flush=True)
        count += 1
    if out_dir is not None:
        print(f"wrote {count} JSON records (and an overlay per request with a picture) to {out_dir}", file=sys.stderr)
    return 0
