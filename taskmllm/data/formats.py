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
from typing import Any, Optional

from taskmllm.data.annotations import LoadResult, PathLike, finish, read_json, require, resolve_path
from taskmllm.data.coco import decode_segmentation, load_coco, load_refcoco
from taskmllm.data.mot import load_mot
from taskmllm.data.sample import Sample
from taskmllm.errors import DataFormatError
from taskmllm.experts import EXPERTS
from taskmllm.model.tokens import IMAGE, VIDEO, place_visual, task_token

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
        if any(task_token(t) in a["value"] for t in EXPERTS):
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
    elif "video" in entry:
        sample.frame_paths = _video_frames(entry["video"], image_root, path, name)
    else:
        return sample
    video = sample.frame_paths is not None
    if not any((VIDEO if video else IMAGE) in q for q, _ in turns):
        q0, a0 = turns[0]
        turns[0] = (place_visual(q0, video, image_first=not question_first), a0)
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


__all__ = ["LoadResult", "load_llava", "load_coco", "load_refcoco", "load_mot", "decode_segmentation"]
