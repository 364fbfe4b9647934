"""Strict, typed configuration loading: plain dicts (JSON, YAML) -> dataclasses, and back.

The one loader every config of taskmllm goes through — the model's ``config.json``, a stage YAML, an expert's
options, an auxiliary loss's options. It rejects unknown keys (naming the closest valid one), missing required
keys and values of the wrong type with a :class:`~taskmllm.errors.ConfigError` whose message is the dotted
path of the offending value::

    @dataclass
    class Optim:
        lr: float = 1e-3
        betas: tuple[float, float] = (0.9, 0.999)

    from_dict(Optim, {"lr": 3e-4, "betas": [0.9, 0.95]}, "optim")   # Optim(lr=0.0003, betas=(0.9, 0.95))
    from_dict(Optim, {"lrr": 1}, "optim")   # ConfigError: unknown key 'optim.lrr' (did you mean 'lr'?); ...

Supported field types: dataclasses (nested), ``int``, ``float`` (an int or a numeric string such as YAML 1.1's
``"1e-3"`` is accepted), ``str``, ``bool``, ``Any``, ``Optional[...]`` / unions, ``Literal[...]``,
``tuple[X, ...]`` / ``tuple[X, Y]``, ``list[X]`` and ``dict[str, X]``. This module imports nothing of taskmllm
but ``errors``, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

from taskmllm.errors import ConfigError

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def suggest(key: str, known: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``known`` to ``key``, else ``""``."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], raw: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from the mapping ``raw``, strictly (see the module docstring).

    Args:
        cls: a dataclass type whose fields are annotated with the supported types.
        raw: the mapping read from a file (or a dict in code).
        where: dotted location of ``raw`` in its file, for messages (``""`` at the top level).

    Raises:
        ConfigError: an unknown or missing key, or a value of the wrong type; the message names its path.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{suggest(str(key), list(fields))}; valid keys: "
                              f"{', '.join(fields)}")
        kwargs[key] = coerce(value, hints[key], path)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing key(s) {', '.join(map(repr, missing))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ that rejects a value: name where it stands
        where = where or cls.__name__
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against (and converted to) type ``tp``; ``path`` names it in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                if len(options) == 1:
                    raise exc
        names = " | ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        item = args[1] if args else Any
        return {str(k): coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        kind = origin or tp
        if kind is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return kind(coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # pragma: no cover - a programming error


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-safe data of a config dataclass (tuples become lists, nested dataclasses dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
