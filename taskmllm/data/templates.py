"""Conversation templates as data: the paraphrases of the questions and answers written for real annotations.

The package ships ``templates.yaml`` (beside this file; its header documents the fields). A source may name its own
file (``templates: FILE`` in ``data.sources``): the keys of the tasks it names replace the shipped ones (a task's
``questions`` alone, say), its ``plurals`` are added, its ``numbers`` replace the list; the rest stays. Every template is checked when loaded: an unknown field, a missing required field (an answer without
``{grounded}``) or a task without questions is a :class:`~taskmllm.errors.ConfigError` naming the file, the task
and the template.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import yaml

from taskmllm.errors import ConfigError
from taskmllm.schema import from_dict

DEFAULT_TEMPLATES = Path(__file__).with_name("templates.yaml")

#: task -> (fields its questions may use, fields a question must use one of)
QUESTION_FIELDS: Mapping[str, tuple[frozenset, frozenset]] = {
    "seg": (frozenset({"phrase"}), frozenset({"phrase"})),
    "rec": (frozenset({"phrase"}), frozenset({"phrase"})),
    "det": (frozenset({"category", "plural"}), frozenset({"category", "plural"})),
    "exist": (frozenset({"category", "plural"}), frozenset({"category", "plural"})),
    "count": (frozenset({"category", "plural"}), frozenset({"category", "plural"})),
    "track": (frozenset({"category", "plural"}), frozenset({"category", "plural"})),
    "track_box": (frozenset({"category", "box"}), frozenset({"box"})),
    "temporal": (frozenset({"category", "plural"}), frozenset({"category", "plural"})),
    "temporal_box": (frozenset({"box", "frame"}), frozenset({"box"})),
}
#: task -> fields every answer must hold (and may: the same set)
ANSWER_FIELDS: Mapping[str, frozenset] = {
    "seg": frozenset({"grounded"}), "rec": frozenset({"grounded"}), "det": frozenset({"grounded"}),
    "track": frozenset({"grounded"}), "track_box": frozenset({"grounded"}), "count": frozenset(),
    "temporal": frozenset({"first", "last"}), "temporal_box": frozenset({"first", "last"}), "exist": frozenset(),
}
_COUNT_FIELDS = frozenset({"count", "count_word"})


@dataclass
class TaskTemplates:
    """The wording of one task. ``questions``: drawn per sample (evaluation asks the first); ``answers``: drawn
    per sample; ``ref``: the phrase inside ``<ref>...</ref>``; ``yes_answers`` / ``no_answers``: the exist task's
    answers."""

    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    ref: str = ""
    yes_answers: list[str] = field(default_factory=list)
    no_answers: list[str] = field(default_factory=list)


@dataclass
class Templates:
    """Every task's :class:`TaskTemplates`, irregular ``plurals`` and the ``numbers`` written as words."""

    seg: TaskTemplates = field(default_factory=TaskTemplates)
    rec: TaskTemplates = field(default_factory=TaskTemplates)
    det: TaskTemplates = field(default_factory=TaskTemplates)
    exist: TaskTemplates = field(default_factory=TaskTemplates)
    count: TaskTemplates = field(default_factory=TaskTemplates)
    track: TaskTemplates = field(default_factory=TaskTemplates)
    track_box: TaskTemplates = field(default_factory=TaskTemplates)
    temporal: TaskTemplates = field(default_factory=TaskTemplates)
    temporal_box: TaskTemplates = field(default_factory=TaskTemplates)
    plurals: dict[str, str] = field(default_factory=dict)
    numbers: list[str] = field(default_factory=list)

    def task(self, name: str) -> TaskTemplates:
        """The templates of task ``name``."""
        return getattr(self, name)

    def plural(self, noun: str) -> str:
        """``noun``'s plural: the last word's irregular form from ``plurals``, else the regular English rule."""
        head, _, last = noun.rpartition(" ")
        if noun in self.plurals:
            return self.plurals[noun]
        if last in self.plurals:
            word = self.plurals[last]
        elif last.endswith(("s", "x", "z", "ch", "sh")):
            word = last + "es"
        elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
            word = last[:-1] + "ies"
        else:
            word = last + "s"
        return f"{head} {word}" if head else word

    def number(self, n: int) -> str:
        """``n`` as a word (``numbers[n]``), digits beyond the list."""
        return self.numbers[n] if 0 <= n < len(self.numbers) else str(n)


def fill(template: str, **values: Any) -> str:
    """``template`` with its fields filled; an answer that starts with a field starts with a capital letter."""
    text = template.format(**values)
    return text[:1].upper() + text[1:] if template.startswith("{") else text


def pick(rng: Optional[np.random.Generator], items: Sequence[str]) -> str:
    """A random item (the first one without ``rng``: evaluation asks deterministic questions)."""
    return items[0] if rng is None else items[int(rng.integers(len(items)))]


def load_templates(path: Union[str, Path, None] = None) -> Templates:
    """The shipped templates with the tasks of ``path`` (a YAML file like ``templates.yaml``) replacing theirs.

    Raises:
        ConfigError: unreadable YAML, an unknown key, or a template with an unknown or missing field (the message
            names the file, the task and the template).
    """
    raw = _read(DEFAULT_TEMPLATES)
    if path is not None:
        for key, value in _read(Path(path)).items():
            merge = isinstance(value, dict) and isinstance(raw.get(key), dict)
            raw[key] = {**raw[key], **value} if merge else value
    where = str(path or DEFAULT_TEMPLATES)
    templates = from_dict(Templates, raw, where)
    for task in QUESTION_FIELDS:
        _check_task(templates.task(task), task, where)
    return templates


def _read(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"templates {path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"templates {path}: the top level must be a mapping of tasks")
    return raw


def _fields(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{where}: {template!r} is not a valid template: {exc}") from exc


def _check_task(t: TaskTemplates, task: str, where: str) -> None:
    allowed, need_one = QUESTION_FIELDS[task]
    if not t.questions:
        raise ConfigError(f"{where}: {task}.questions is empty; give at least one question")
    for i, q in enumerate(t.questions):
        names = _fields(q, f"{where}: {task}.questions[{i}]")
        if names - allowed or not names & need_one:
            raise ConfigError(f"{where}: {task}.questions[{i}] {q!r} must use one of {sorted(need_one)} and only "
                              f"{sorted(allowed)}")
    if task == "exist":
        for key in ("yes_answers", "no_answers"):
            if not getattr(t, key) or any(_fields(a, f"{where}: {task}.{key}") for a in getattr(t, key)):
                raise ConfigError(f"{where}: exist.{key} must be a non-empty list of answers without fields")
        return
    required = ANSWER_FIELDS[task]
    may = required | (_COUNT_FIELDS if task == "count" else frozenset())
    if not t.answers:
        raise ConfigError(f"{where}: {task}.answers is empty; give at least one answer")
    for i, a in enumerate(t.answers):
        names = _fields(a, f"{where}: {task}.answers[{i}]")
        ok = names <= may and required <= names and (task != "count" or names & _COUNT_FIELDS)
        if not ok:
            want = "{count} or {count_word}" if task == "count" else ", ".join("{%s}" % n for n in sorted(required))
            raise ConfigError(f"{where}: {task}.answers[{i}] {a!r} must hold {want} and no other field")
    if "grounded" in required:
        names = _fields(t.ref, f"{where}: {task}.ref")
        if not t.ref or not names <= allowed - {"box"}:
            raise ConfigError(f"{where}: {task}.ref {t.ref!r} must be a phrase using only "
                              f"{sorted(allowed - {'box'})}")


__all__ = ["DEFAULT_TEMPLATES", "TaskTemplates", "Templates", "fill", "load_templates", "pick"]
