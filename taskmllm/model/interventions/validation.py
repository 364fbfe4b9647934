"""Typed checks of intervention settings: a bad value raises :class:`~taskmllm.errors.ConfigError` naming the
parameter and the value (``VHR alpha must be a finite number > 0, got '2'``)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence

from taskmllm.errors import ConfigError


def check_number(owner: str, name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within ``[low, high]`` (an open end with ``low_open`` / ``high_open``).

    Booleans and strings are rejected (``'2'`` is not 2). Returns the float.
    """
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    where = f" in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{owner} {name} must be a finite number{where}, got {value!r} ({type(value).__name__})")
    x = float(value)
    bad = not math.isfinite(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if bad:
        raise ConfigError(f"{owner} {name} must be a finite number{where}, got {value!r}")
    return x


def check_index_list(owner: str, name: str, value: Any, allow_negative: bool = True) -> list[int]:
    """A sequence of integer indices (layers, dimensions) as a list of ints; a 1-D integer tensor or array and a
    set are accepted too.

    Raises:
        ConfigError: not a sequence (e.g. a bare int or a string), or an element that is not an integer
            (``1.5``, ``'a'``, ``True``), or a negative index where none is allowed.
    """
    items = value
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        items = value.tolist()
    elif isinstance(value, (set, frozenset)):
        items = list(value)
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, range)):
        raise ConfigError(f"{owner} {name} must be a list of integers, got {value!r} ({type(value).__name__})")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise ConfigError(f"{owner} {name} must be a list of integers, got the element {item!r} "
                              f"({type(item).__name__}) in {value!r}")
        if not allow_negative and int(item) < 0:
            raise ConfigError(f"{owner} {name} must be >= 0, got {int(item)} in {value!r}")
        out.append(int(item))
    return out


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{owner} {name} must be one of {list(choices)}, got {value!r}")
    return value


def check_settings(owner: str, settings: Any, known: Sequence[str]) -> dict[str, Any]:
    """A settings mapping with only ``known`` keys, as a dict (for ``from_settings``)."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{owner} settings must be a mapping, got {settings!r} ({type(settings).__name__})")
    unknown = sorted(str(k) for k in set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown {owner} settings {unknown}; known: {list(known)}")
    return dict(settings)
