"""Text replay: conversations answered by the untouched base LLM, mixed into training to keep its language.

A pretrained LLM tuned on image questions alone forgets how to answer anything else (the first ``smol`` recipe
with a ``see`` stage answered 2 of 8 factual questions its base answers 7 of, and a three-turn chat turned into
task calls). The usual cure is to replay text-only instruction data; with no dataset at hand, the base model
writes it: each prompt of a prompt file (single questions and multi-turn chats) is answered greedily by the base,
turn by turn, and the conversations are written as LLaVA JSON without images — a ``llava`` source a stage mixes in
by weight::

    taskmllm data replay --base smol --prompts taskmllm/assets/replay/prompts.json --out replay.json

The prompt file is ``{"single": [question, ...], "chats": [[user turn, user turn, ...], ...]}``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from taskmllm.errors import ConfigError

__all__ = ["load_prompts", "replay_conversations", "whole_sentences", "write_replay"]

PathLike = Union[str, Path]


def load_prompts(path: PathLike) -> list[list[str]]:
    """The conversations of a prompt file, each a list of user turns (a single question is a list of one).

    Raises:
        ConfigError: a file that is not such a mapping of ``single`` and ``chats`` (naming the first bad entry).
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"prompts {str(path)!r}: cannot read JSON: {exc}") from exc
    if not isinstance(raw, dict) or not (raw.get("single") or raw.get("chats")):
        raise ConfigError(f"prompts {str(path)!r}: expected {{'single': [question, ...], 'chats': [[turn, ...]]}}")
    out = [[q] for q in raw.get("single", [])] + [list(c) for c in raw.get("chats", [])]
    for i, turns in enumerate(out):
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ConfigError(f"prompts {str(path)!r}: conversation {i} is not a non-empty list of non-empty texts")
    return out


def whole_sentences(text: str) -> Optional[str]:
    """``text`` up to its last sentence end (``.``, ``!``, ``?``, or one followed by a closing quote or bracket),
    or None when it has none: an answer cut by ``max_new_tokens`` must not teach the model to stop mid-sentence."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s|$)", text)]
    return text[:ends[-1]] if ends else None


def replay_conversations(pipe: Any, conversations: Sequence[Sequence[str]], max_new_tokens: int = 96,
                         batch_size: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """LLaVA entries (no image) of ``conversations`` answered greedily by ``pipe`` turn by turn.

    ``pipe`` is a :class:`~taskmllm.router.pipeline.Pipeline` (its ``chat_batch``). A conversation whose answer
    calls an expert or has no whole sentence is left out (LLaVA JSON carries no expert targets); an answer is kept up
    to its last whole sentence (:func:`whole_sentences`), and the next turn sees it so.
    """
    entries = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="replay", disable=not progress):
        chunk = [list(c) for c in conversations[start:start + batch_size]]
        histories: list[list[tuple[str, str]]] = [[] for _ in chunk]
        alive = list(range(len(chunk)))
        for turn in range(max(len(c) for c in chunk)):
            ask = [i for i in alive if turn < len(chunk[i])]
            if not ask:
                break
            for i in ask:
                histories[i].append(("user", chunk[i][turn]))
            results = pipe.chat_batch([None] * len(ask), [histories[i] for i in ask], max_new_tokens=max_new_tokens)
            for i, result in zip(ask, results):
                answer = whole_sentences(result.raw_text)
                if result.calls or not answer:
                    alive.remove(i)
                    continue
                histories[i].append(("assistant", answer))
        for i in alive:
            turns = [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in histories[i]]
            entries.append({"id": f"replay-{start + i}", "conversations": turns})
    return entries


def write_replay(pipe: Any, prompts: PathLike, out: PathLike, max_new_tokens: int = 96, batch_size: int = 8,
                 progress: bool = True) -> int:
    """Answer the prompt file ``prompts`` with ``pipe`` and write the LLaVA JSON ``out`` (atomically).

    Returns the number of conversations written.
    """
    entries = replay_conversations(pipe, load_prompts(prompts), max_new_tokens, batch_size, progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return len(entries)
