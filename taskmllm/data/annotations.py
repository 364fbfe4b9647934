"""The shared error API and helpers of the annotation-file loaders (:mod:`taskmllm.data.formats`).

Each entry of a file is validated on its own. A malformed entry becomes a
:class:`~taskmllm.errors.DataFormatError` naming the file and the entry (``annotations[3] (id=17)``,
``line 5``) and is skipped; valid entries of the same file are kept. Loaders return a :class:`LoadResult`
(``samples`` and ``errors``); :func:`finish` turns a result with errors into one ``DataFormatError`` when the
loader was asked to be strict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from taskmllm.data.sample import Sample
from taskmllm.errors import DataFormatError

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
