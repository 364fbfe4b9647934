"""The closed vocabulary of ShapesWorld: shapes, colors, sizes, numbers, and synonyms for CHAIR.

Everything a ShapesWorld text can name is here, so the tokenizer corpus, the conversation templates, the
referring-expression checker and CHAIR all agree on one small, regular vocabulary.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

#: Shape classes (the "objects" of ShapesWorld for POPE and CHAIR), in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart")

#: Color name -> RGB. Saturated colors, far from the neutral background palette.
COLORS: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 200, 215),
})

#: Size name -> circumradius as a fraction of the image side.
SIZES: Mapping[str, float] = MappingProxyType({"small": 0.085, "medium": 0.13, "large": 0.19})

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine", "ten", "eleven", "twelve")

#: CHAIR: each shape class and the words (singular and plural) that mention it.
CHAIR_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "circle": ("circle", "circles", "disc", "discs", "disk", "disks"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars", "pentagram", "pentagrams"),
    "hexagon": ("hexagon", "hexagons"),
    "heart": ("heart", "hearts"),
})

_WORD_TO_CLASS: Mapping[str, str] = MappingProxyType(
    {w: cls for cls, words in CHAIR_SYNONYMS.items() for w in words})
_WORD_RE = re.compile(r"[a-z]+")


def plural(shape: str) -> str:
    """Plural of a shape word (all ShapesWorld shapes take ``-s``)."""
    return shape + "s"


def number_word(n: int) -> str:
    """``2 -> "two"``; digits beyond the table."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def mentioned_objects(text: str) -> list[str]:
    """Shape classes mentioned in ``text``, one entry per mention, in order (CHAIR's object extraction).

    Protocol tokens are ignored; matching is on whole lower-case words through :data:`CHAIR_SYNONYMS`.
    """
    words = _WORD_RE.findall(re.sub(r"<[^>]*>", " ", text.lower()))
    return [_WORD_TO_CLASS[w] for w in words if w in _WORD_TO_CLASS]
