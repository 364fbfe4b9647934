"""Referring expressions over ShapesWorld objects: generation of expressions that name exactly one object,
and the resolver that defines their meaning.

Grammar (lower case, no punctuation)::

    expr   := "the" [POS] [SIZE] [COLOR] NOUN
    POS    := "leftmost" | "rightmost" | "topmost" | "bottommost"
    NOUN   := SHAPE | "object"

Meaning: SIZE, COLOR and SHAPE filter the objects (``object`` matches any shape). Without POS the
expression names the filtered set, which must hold exactly one object. With POS it names the object with the
extreme **visible-box centre** along the axis (smallest x for leftmost, smallest y for topmost, ...) among at
least two filtered objects, and only when it beats the runner-up by ``POS_MARGIN`` x image side.

Spatial relations between two objects (VQA) use the same centres: A is left of B when
``cx(A) + REL_MARGIN * W < cx(B)``; a relation is asked only when it holds or its opposite holds.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

from taskmllm.data.shapesworld.world import Shape

POS_MARGIN = 0.08
REL_MARGIN = 0.08
POSITIONS: dict[str, tuple[int, int]] = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1),
                                         "bottommost": (1, -1)}  # (axis: 0 = x, 1 = y; 1 = min, -1 = max)
RELATIONS: dict[str, tuple[int, int]] = {"to the left of": (0, 1), "to the right of": (0, -1),
                                         "above": (1, 1), "below": (1, -1)}


def center(obj: Shape, frame: Optional[int] = None) -> np.ndarray:
    """``(2,)`` centre ``(cx, cy)`` of the object's visible box (in ``frame`` for videos)."""
    box = obj.box if frame is None else obj.boxes[frame]
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _matches(obj: Shape, size: Optional[str], color: Optional[str], shape: Optional[str]) -> bool:
    return ((size is None or obj.size == size) and (color is None or obj.color == color)
            and (shape is None or obj.category == shape))


def _phrase(pos: Optional[str], size: Optional[str], color: Optional[str], shape: Optional[str]) -> str:
    return " ".join(w for w in ("the", pos, size, color, shape or "object") if w)


def _extreme(objs: Sequence[Shape], pos: str, side: float) -> Optional[Shape]:
    axis, sign = POSITIONS[pos]
    if len(objs) < 2:
        return None
    keyed = sorted(objs, key=lambda o: sign * center(o)[axis])
    gap = sign * (center(keyed[1])[axis] - center(keyed[0])[axis])
    return keyed[0] if gap >= POS_MARGIN * side else None


def expressions(objects: Sequence[Shape], target: Shape, side: float, positional: bool = True,
                omit: Sequence[str] = ()) -> list[str]:
    """Every expression of the grammar that names ``target`` and only it.

    Args:
        objects: all objects of the scene (``target`` among them).
        side: image side in pixels (for the positional margin).
        positional: allow POS words (images only; video objects move).
        omit: attributes never to use: any of ``"size"``, ``"color"``, ``"shape"`` (e.g. omit the color when
            the question asks for it).
    """
    out = []
    sizes = [None] if "size" in omit else [None, target.size]
    colors = [None] if "color" in omit else [None, target.color]
    shapes = [None] if "shape" in omit else [None, target.category]
    for size, color, shape in itertools.product(sizes, colors, shapes):
        group = [o for o in objects if _matches(o, size, color, shape)]
        if len(group) == 1:
            out.append(_phrase(None, size, color, shape))
        elif positional:
            for pos in POSITIONS:
                if _extreme(group, pos, side) is target:
                    out.append(_phrase(pos, size, color, shape))
    return out


def resolve(expression: str, objects: Sequence[Shape], side: float) -> list[Shape]:
    """The objects an expression names (one when it is a valid referring expression), per the grammar above."""
    words = expression.split()
    if not words or words[0] != "the":
        return []
    words = words[1:]
    pos = words.pop(0) if words and words[0] in POSITIONS else None
    noun = words.pop() if words else None
    sizes = {o.size for o in objects}
    size = words.pop(0) if words and words[0] in sizes else None
    color = words.pop(0) if words else None
    if words or noun is None:
        return []
    group = [o for o in objects if _matches(o, size, color, None if noun == "object" else noun)]
    if pos is None:
        return group
    hit = _extreme(group, pos, side)
    return [hit] if hit is not None else []


def relation_holds(a: Shape, b: Shape, relation: str, side: float) -> Optional[bool]:
    """True / False when ``a`` clearly is / is not ``relation`` ``b``; ``None`` when too close to tell."""
    axis, sign = RELATIONS[relation]
    d = sign * (center(b)[axis] - center(a)[axis])
    if d >= REL_MARGIN * side:
        return True
    if d <= -REL_MARGIN * side:
        return False
    return None
