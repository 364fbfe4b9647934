"""The token protocol: the single source of special tokens, the chat template and the ``<box>`` codec.

Protocol (see DESIGN.md):

- ``<image>`` in a prompt expands to the image's visual tokens; ``<video>`` to each frame's tokens in order.
  Both expand to repeated ``<image>`` placeholder ids whose input embeddings are replaced by visual features.
- Task tokens ``<name>`` — one per expert of the model; the expert registry (``taskmllm.experts.EXPERTS``) is
  the one list of task names, e.g. ``<seg>``, ``<det>``, ``<track>`` — are ordinary vocabulary entries the LLM
  learns to emit. After a task token come K ``<query>`` placeholders whose embeddings are the task's learnable
  queries; their last-layer hidden states are what the router hands to the expert.
- ``<ref>phrase</ref>`` names what the following task token applies to.
- ``<box>x1,y1,x2,y2</box>`` carries a box as text, integers 0-999 normalized to the image size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from taskmllm.errors import BoxFormatError

IMAGE = "<image>"
VIDEO = "<video>"
QUERY = "<query>"
REF_OPEN, REF_CLOSE = "<ref>", "</ref>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"

#: Tokens every taskmllm tokenizer holds as single ids (besides the LLM's own BOS/EOS/PAD and the task tokens
#: of the model's experts, :func:`task_token`).
PROTOCOL_TOKENS: tuple[str, ...] = (IMAGE, VIDEO, QUERY, REF_OPEN, REF_CLOSE, BOX_OPEN, BOX_CLOSE)

BOX_MAX = 999
_BOX_RE = re.compile(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), re.S)
_REF_RE = re.compile(re.escape(REF_OPEN) + r"(.*?)" + re.escape(REF_CLOSE), re.S)


def task_token(name: str) -> str:
    """The task token string of a task (expert) name: ``"seg" -> "<seg>"``."""
    return f"<{name}>"


# --------------------------------------------------------------------------------------------- boxes
def encode_box(box: Sequence[float], width: float = 1.0, height: float = 1.0) -> str:
    """Write a box as ``<box>x1,y1,x2,y2</box>`` with integers 0-999.

    Args:
        box: ``(x1, y1, x2, y2)`` in pixels of an image of ``width`` x ``height`` (defaults: normalized 0-1).
    """
    if len(box) != 4:
        raise BoxFormatError(f"a box needs 4 numbers (x1, y1, x2, y2), got {len(box)}")
    scale = (width, height, width, height)
    ints = [min(BOX_MAX, max(0, round(float(v) / s * BOX_MAX))) for v, s in zip(box, scale)]
    return f"{BOX_OPEN}{ints[0]},{ints[1]},{ints[2]},{ints[3]}{BOX_CLOSE}"


def parse_box_body(body: str) -> tuple[int, int, int, int]:
    """Parse the text between ``<box>`` and ``</box>`` into four integers in 0-999."""
    parts = [p.strip() for p in body.split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise BoxFormatError(f"malformed box {BOX_OPEN}{body}{BOX_CLOSE}: expected four integers 'x1,y1,x2,y2'")
    ints = tuple(int(p) for p in parts)
    if not all(0 <= v <= BOX_MAX for v in ints):
        raise BoxFormatError(f"box {BOX_OPEN}{body}{BOX_CLOSE} has a coordinate outside 0-{BOX_MAX}")
    return ints  # type: ignore[return-value]


def decode_boxes(text: str, width: float = 1.0, height: float = 1.0) -> list[tuple[float, float, float, float]]:
    """Every ``<box>`` in ``text`` as ``(x1, y1, x2, y2)`` in pixels of a ``width`` x ``height`` image.

    Raises:
        BoxFormatError: a box is malformed or has a coordinate outside 0-999.
    """
    boxes = []
    for body in _BOX_RE.findall(text):
        x1, y1, x2, y2 = parse_box_body(body)
        boxes.append((x1 / BOX_MAX * width, y1 / BOX_MAX * height, x2 / BOX_MAX * width, y2 / BOX_MAX * height))
    return boxes


def place_visual(text: str, video: bool = False, image_first: bool = False, repeat_question: bool = False) -> str:
    """``text`` with one ``<image>`` (``<video>``) placeholder on its own line before it (``image_first``,
    LLaVA's layout) or after it (the question first); ``repeat_question``: the text on both sides of it
    (``"<text>\n<image>\n<text>"``, whatever ``image_first`` says)."""
    marker = VIDEO if video else IMAGE
    if repeat_question:
        return f"{text}\n{marker}\n{text}"
    return f"{marker}\n{text}" if image_first else f"{text}\n{marker}"


def find_refs(text: str) -> list[str]:
    """The phrases of every ``<ref>…</ref>`` in ``text``, in order."""
    return [p.strip() for p in _REF_RE.findall(text)]


def strip_protocol(text: str, tasks: Iterable[str]) -> str:
    """Text for people: drop query placeholders, keep phrases, drop ref markers and the task tokens of ``tasks``
    (task names), keep boxes as text."""
    for tok in (QUERY, REF_OPEN, REF_CLOSE, *(task_token(t) for t in tasks)):
        text = text.replace(tok, "")
    return re.sub(r"[ \t]+", " ", text).strip()


# ---------------------------------------------------------------------------------------- chat template
@dataclass(frozen=True)
class ChatTemplate:
    """A single-turn chat template (LLaVA v1 style by default).

    ``prompt(q)`` is what the model sees before it answers; ``prompt(q) + answer + eos`` is a training text.
    """

    system: str = ""
    user_prefix: str = "USER: "
    assistant_prefix: str = " ASSISTANT:"
    answer_sep: str = " "

    def prompt(self, question: str, history: Sequence[tuple[str, str]] = (), eos: str = "") -> str:
        """The text up to where the assistant starts answering ``question`` after earlier turns."""
        text, prefix = self.system, self.user_prefix if self.system else self.user_prefix.lstrip("\n")
        for q, a in history:  # without system text the first turn opens the prompt: no newline before it
            text += f"{prefix}{q}{self.assistant_prefix}{self.answer_sep}{a}{eos}"
            prefix = self.user_prefix
        return text + f"{prefix}{question}{self.assistant_prefix}"

    def full(self, question: str, answer: str, eos: str) -> str:
        """Prompt followed by the answer and ``eos``: one supervised training text."""
        return self.prompt(question) + self.answer_sep + answer + eos

    def to_dict(self) -> dict[str, str]:
        return {"system": self.system, "user_prefix": self.user_prefix,
                "assistant_prefix": self.assistant_prefix, "answer_sep": self.answer_sep}
