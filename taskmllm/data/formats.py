"""Loaders of real annotation formats into :class:`~taskmllm.data.sample.Sample`.

- :func:`load_llava` - LLaVA conversation JSON (``[{"id", "image", "conversations": [{"from", "value"}]}]``);
- :func:`~taskmllm.data.coco.load_coco` / :func:`~taskmllm.data.coco.load_refcoco` - COCO instances (polygon
  and RLE masks through pycocotools) and RefCOCO-style refs;
- :func:`~taskmllm.data.mot.load_mot` - MOT-challenge sequences (``seqinfo.ini``, ``img1/``, ``gt/gt.txt``).

Error API, the same for every loader: each entry is validated on its own. A malformed entry becomes a
:class:`~taskmllm.errors.DataFormatError` naming the file and the entry (``annotations[3] (id=17)``,
``line 5``) and is skipped; valid entries of the same file are kept. Loaders return a :class:`LoadResult`
(``samples`` and ``errors``). With ``strict=True`` (default) a file with any malformed entry raises one
``DataFormatError`` naming the first entry, with every entry's error in ``.errors`` and the valid samples in
``.partial`` (a :class:`LoadResult`). A file that cannot be read at all raises regardless of ``strict``.
Pixels stay on disk (``image_path`` / ``frame_paths``) until :meth:`Sample.load`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from taskmllm.data.sample import Sample
from taskmllm.errors import DataFormatError
from taskmllm.model.tokens import IMAGE, TASK_TOKENS, VIDEO

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class LoadResult:
    """What a loader read: the valid samples and one error per malformed entry."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[DataFormatError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def finish(result: LoadResult, source: PathLike, strict: bool) -> LoadResult:
    """Return ``result``, or raise the summary ``DataFormatError`` when ``strict`` and it holds errors."""
    if strict and result.errors:
        first = result.errors[0]
        n = len(result.errors)
        raise DataFormatError(source, first.entry, f"{first.reason}" + (f" (and {n - 1} more malformed "
                              f"entries)" if n > 1 else ""), errors=tuple(result.errors), partial=result)
    return result


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; unreadable or invalid JSON raises ``DataFormatError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "file", f"cannot read JSON: {exc}") from exc


def require(entry: Any, keys: tuple[str, ...], source: PathLike, name: str) -> None:
    """Raise ``DataFormatError`` naming ``name`` when ``entry`` is not a dict holding every key."""
    if not isinstance(entry, dict):
        raise DataFormatError(source, name, f"expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataFormatError(source, name, f"missing key(s) {', '.join(map(repr, missing))}")


def resolve_path(root: Optional[PathLike], rel: str) -> str:
    """``rel`` under ``root`` (``rel`` itself when it is absolute or there is no root)."""
    return rel if root is None or os.path.isabs(rel) else os.path.join(root, rel)


# ------------------------------------------------------------------------------------------ LLaVA
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def load_llava(json_path: PathLike, image_root: Optional[PathLike] = None, strict: bool = True,
               check_files: bool = True, question_first: bool = True) -> LoadResult:
    """Load a LLaVA conversation JSON file (a list of entries, or JSON lines).

    Each entry has ``conversations``: alternating ``human``/``gpt`` turns (``user``/``assistant`` accepted),
    and optionally ``image`` (a path under ``image_root``) or ``video`` (a list of frame paths or a folder of
    frames). A visual entry whose turns lack the placeholder gets one added to its first question (before or
    after the text per ``question_first``). Answers must not hold task tokens: LLaVA JSON carries no expert
    targets for them.

    Returns:
        ``LoadResult`` of samples with ``source="llava"``, ``task="conversation"``, pixels on disk.
    """
    path = str(json_path)
    if path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise DataFormatError(path, "file", f"cannot read JSON lines: {exc}") from exc
    else:
        data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "file", "expected a list of conversation entries at the top level")
    result = LoadResult()
    for i, entry in enumerate(data):
        name = f"[{i}]" + (f" (id={entry.get('id')})" if isinstance(entry, dict) and "id" in entry else "")
        try:
            result.samples.append(_llava_entry(entry, i, name, path, image_root, check_files, question_first))
        except DataFormatError as err:
            result.errors.append(err)
    return finish(result, path, strict)


def _llava_entry(entry: Any, i: int, name: str, path: str, image_root: Optional[PathLike],
                 check_files: bool, question_first: bool) -> Sample:
    require(entry, ("conversations",), path, name)
    conv = entry["conversations"]
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        raise DataFormatError(path, name, "'conversations' must be a non-empty list of question/answer pairs")
    turns = []
    for k in range(0, len(conv), 2):
        q, a = conv[k], conv[k + 1]
        for j, msg, role in ((k, q, "user"), (k + 1, a, "assistant")):
            require(msg, ("from", "value"), path, f"{name} conversations[{j}]")
            if _ROLES.get(msg["from"]) != role or not isinstance(msg["value"], str):
                raise DataFormatError(path, f"{name} conversations[{j}]",
                                      f"expected a {role} turn with a string value, got from={msg['from']!r}")
        if any(tok in a["value"] for tok in TASK_TOKENS.values()):
            raise DataFormatError(path, f"{name} conversations[{k + 1}]",
                                  "answer holds a task token but LLaVA JSON has no expert targets for it")
        turns.append((q["value"], a["value"]))
    sample = Sample(id=f"llava/{entry.get('id', i)}", source="llava", task="conversation", turns=turns,
                    meta={"entry": i})
    if "image" in entry:
        if not isinstance(entry["image"], str):
            raise DataFormatError(path, name, "'image' must be a path string")
        sample.image_path = resolve_path(image_root, entry["image"])
        if check_files and not os.path.isfile(sample.image_path):
            raise DataFormatError(path, name, f"image file not found: {sample.image_path}")
        placeholder = IMAGE
    elif "video" in entry:
        sample.frame_paths = _video_frames(entry["video"], image_root, path, name)
        placeholder = VIDEO
    else:
        return sample
    if not any(placeholder in q for q, _ in turns):
        q0, a0 = turns[0]
        turns[0] = (f"{q0}\n{placeholder}" if question_first else f"{placeholder}\n{q0}", a0)
    return sample


def _video_frames(video: Any, root: Optional[PathLike], path: str, name: str) -> list[str]:
    if isinstance(video, list) and video and all(isinstance(v, str) for v in video):
        return [resolve_path(root, v) for v in video]
    if isinstance(video, str):
        folder = resolve_path(root, video)
        if os.path.isdir(folder):
            frames = sorted(f for f in os.listdir(folder)
                            if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp")))
            if frames:
                return [os.path.join(folder, f) for f in frames]
        raise DataFormatError(path, name, f"video {video!r} is not a folder of frames (encoded video files "
                              "are not supported; extract frames first)")
    raise DataFormatError(path, name, "'video' must be a list of frame paths or a folder of frames")


# The COCO/RefCOCO and MOT loaders live in their own modules and are re-exported here (they import the
# helpers above, so these imports stay at the bottom).
from taskmllm.data.coco import decode_segmentation, load_coco, load_refcoco  # noqa: E402
from taskmllm.data.mot import load_mot  # noqa: E402

__all__ = ["LoadResult", "load_llava", "load_coco", "load_refcoco", "load_mot", "decode_segmentation"]
