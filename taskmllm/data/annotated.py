"""The data-source kinds of annotation files: ``refcoco``, ``coco`` and ``mot`` (``data.sources`` of a stage).

Each reads its files once (masks kept as compressed RLE, decoded per sample; strictly by default: a malformed entry is a :class:`~taskmllm.errors.DataFormatError`
naming the file and the entry; ``strict: false`` skips such entries with a warning) and writes conversations on the
fly with :class:`~taskmllm.data.grounded.GroundedBuilder`, its tasks mixed by ``mix``::

    data:
      sources:
        refs:   {kind: refcoco, path: refcoco/refs.json, instances: refcoco/instances.json,
                 image_root: refcoco/images, split: train, mix: {seg: 1.0, rec: 1.0}}
        coco:   {kind: coco, path: coco/annotations/instances_train.json, image_root: coco/train,
                 mix: {det: 1.0, exist: 0.5, count: 0.5}, max_instances: 8, attributes: [color]}
        tracks: {kind: mot, path: mot/train, clip_len: 8, stride: 1, mix: {track_box: 1.0, temporal_box: 0.5}}

Options every kind has: ``path``, ``image_root``, ``mix``, ``templates`` (a YAML file replacing some of the shipped
paraphrases, :mod:`taskmllm.data.templates`), ``boxes_in_answer`` (UnifiedMLLM-style ``<box>`` text in det / rec
answers), ``strict``. Item ``i`` of a task is a scene drawn with ``(data.seed, task, i)`` among those that support
the task (a source whose files support none of a task's questions is a ``ConfigError`` when the stage starts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Mapping, Optional, Union

import numpy as np

from taskmllm.data.annotations import LoadResult
from taskmllm.data.coco import load_coco, load_refs
from taskmllm.data.dataset import VIRTUAL_LEN, MixedDataset, SourceSpec
from taskmllm.data.grounded import EXPERT_OF, GroundedBuilder, GroundedOptions
from taskmllm.data.mot import load_mot, mot_sequences
from taskmllm.data.sample import Sample
from taskmllm.data.templates import load_templates
from taskmllm.errors import ConfigError
from taskmllm.schema import suggest

log = logging.getLogger(__name__)

#: Why a scene may not support a task (for the error when none does).
NEEDS: Mapping[str, str] = {"seg": "refs", "rec": "refs", "det": "images with objects",
                            "exist": "images", "count": "images", "track": "an object whose category is unique "
                            "in its clip", "track_box": "an object visible in a clip's first frame",
                            "temporal": "an object whose category is unique in its clip",
                            "temporal_box": "a clip with a track"}


class TaskOverScenes:
    """An endless source of ``task`` conversations about the scenes that support it (item ``i``: a scene and the
    wording drawn with ``(seed, task, i)``)."""

    def __init__(self, scenes: list[Sample], task: str, builder: GroundedBuilder, seed: int, where: str) -> None:
        self.eligible = [s for s in scenes if builder.supports(s, task)]
        if not self.eligible:
            raise ConfigError(f"{where}: none of its {len(scenes)} scenes supports task {task!r} (it needs "
                              f"{NEEDS[task]}); drop it from mix")
        self.task, self.builder, self.seed = task, builder, int(seed)
        self._key = list(EXPERT_OF).index(task)

    def __len__(self) -> int:
        return VIRTUAL_LEN

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, 300 + self._key, int(index)])
        scene = self.eligible[int(rng.integers(len(self.eligible)))]
        return self.builder.build(scene, self.task, rng)


@dataclass
class AnnotatedSpec(SourceSpec):
    """What the annotation-file kinds share (see the module doc); subclasses set ``TASKS`` and ``load``."""

    TASKS: ClassVar[tuple[str, ...]] = ()

    path: str = ""
    image_root: str = ""
    mix: dict[str, float] = field(default_factory=dict)
    templates: str = ""
    boxes_in_answer: bool = False
    strict: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for task, weight in self.mix.items():
            if task not in self.TASKS:
                raise ConfigError(f"mix: {task!r}{suggest(task, list(self.TASKS))} is not a task of kind "
                                  f"{self.kind!r}; its tasks: {', '.join(self.TASKS)}")
            if not weight >= 0:
                raise ConfigError(f"mix.{task}: weight must be >= 0, got {weight}")
        if not any(w > 0 for w in self.mix.values()):
            raise ConfigError("mix: give at least one task a weight > 0")

    # ---------------------------------------------------------------------------------- files
    def check_files(self) -> None:
        if not self.path or not Path(self.path).exists():
            raise ConfigError(f"path: {self.path!r} does not exist")
        for name in ("image_root", "templates"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ConfigError(f"{name}: {value!r} does not exist")

    def load(self) -> LoadResult:
        """Read the annotation files (subclasses)."""
        raise NotImplementedError

    def scenes(self) -> list[Sample]:
        """The scenes of the files, read once (malformed entries: an error, or skipped with ``strict: false``)."""
        cached = getattr(self, "_scenes", None)
        if cached is None:
            result = self.load()
            for err in result.errors:
                log.warning("skipped a malformed entry: %s", err)
            cached = self._scenes = list(result.samples)
            if not cached:
                raise ConfigError(f"path: {self.path!r} holds no usable {self.kind} sample")
        return cached

    # ---------------------------------------------------------------------------------- samples
    def grounded_options(self) -> GroundedOptions:
        return GroundedOptions(boxes_in_answer=self.boxes_in_answer)

    def build(self, length: int, seed: int) -> MixedDataset:
        builder = GroundedBuilder(load_templates(self.templates or None), self.grounded_options())
        scenes = self.scenes()
        sources = {t: TaskOverScenes(scenes, t, builder, seed, f"{self.kind} source {self.path!r}")
                   for t, w in self.mix.items() if w > 0}
        return MixedDataset(sources, self.mix, length, seed)

    def label_classes(self) -> dict[str, tuple[str, ...]]:
        classes: dict[str, dict[str, None]] = {"category": {}}
        for scene in self.scenes():
            for c in scene.meta.get("categories", ()):
                classes["category"][c] = None
            for o in scene.objects:
                classes["category"][o.category] = None
                for kind, value in o.labels.items():
                    classes.setdefault(kind, {})[value] = None
        return {kind: tuple(values) for kind, values in classes.items()}

    def check_model(self, tasks: Mapping[str, int], max_frames: int) -> None:
        for task, weight in self.mix.items():
            expert = EXPERT_OF[task]
            if weight > 0 and expert is not None and expert not in tasks:
                raise ConfigError(f"mix.{task}: its answers call <{expert}> but the model has no {expert!r} expert "
                                  f"(its experts: {', '.join(tasks) or 'none'})")


@dataclass
class RefcocoSpec(AnnotatedSpec):
    """``kind: refcoco``: ``path`` the refs (``refs.json``, or the refer toolkit's ``refs(unc).p`` with
    ``allow_pickle: true``), ``instances`` the COCO instances of their images, ``split`` the refs kept (all when
    empty). Tasks: ``seg`` (the object's mask), ``rec`` (its box)."""

    TASKS: ClassVar[tuple[str, ...]] = ("seg", "rec")

    instances: str = ""
    split: str = ""
    allow_pickle: bool = False
    mix: dict[str, float] = field(default_factory=lambda: {"seg": 1.0, "rec": 1.0})

    def check_files(self) -> None:
        super().check_files()
        if not self.instances or not Path(self.instances).is_file():
            raise ConfigError(f"instances: {self.instances!r} does not exist (the COCO instances file of the refs)")

    def load(self) -> LoadResult:
        return load_refs(self.instances, self.path, self.image_root or None, self.split or None, self.strict,
                         self.allow_pickle, lazy_masks=True)


@dataclass
class CocoSpec(AnnotatedSpec):
    """``kind: coco``: ``path`` a COCO instances file. Tasks: ``det`` ("find every <category>", at most
    ``max_instances`` boxes: the largest; set it to the ``<det>`` expert's query count), ``exist``, ``count``;
    ``absent``: share of det / count questions about a category missing from the image; ``attributes``: object
    labels (the annotations' ``attributes``) that may qualify the category ("red circles", share ``qualified``)."""

    TASKS: ClassVar[tuple[str, ...]] = ("det", "exist", "count")

    mix: dict[str, float] = field(default_factory=lambda: {"det": 1.0})
    max_instances: int = 8
    absent: float = 0.15
    attributes: list[str] = field(default_factory=list)
    qualified: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.grounded_options()

    def grounded_options(self) -> GroundedOptions:
        return GroundedOptions(self.max_instances, self.absent, tuple(self.attributes), self.qualified,
                               self.boxes_in_answer)

    def load(self) -> LoadResult:
        return load_coco(self.path, self.image_root or None, self.strict, keep_empty=True,  # negatives too
                         lazy_masks=True)

    def check_model(self, tasks: Mapping[str, int], max_frames: int) -> None:
        super().check_model(tasks, max_frames)
        if self.mix.get("det", 0) > 0 and self.max_instances > tasks["det"]:
            raise ConfigError(f"max_instances: {self.max_instances} boxes per answer, but the model's <det> expert "
                              f"predicts at most {tasks['det']}; set max_instances: {tasks['det']} (or give the "
                              f"expert more queries: model.tasks.det)")


@dataclass
class MotSpec(AnnotatedSpec):
    """``kind: mot``: ``path`` a MOT sequence folder, or a folder of them (``MOT17/train``). Clips of ``clip_len``
    frames (at most the model's ``max_frames``), every ``stride``-th frame; ``classes``: the class ids kept
    (``auto``: those ``seqinfo.ini`` names, else pedestrians; ``all``); ``min_visibility``: a row counts as visible
    above it. Tasks: ``track_box``, ``track``, ``temporal``, ``temporal_box`` (see :mod:`taskmllm.data.grounded`)."""

    TASKS: ClassVar[tuple[str, ...]] = ("track", "track_box", "temporal", "temporal_box")

    mix: dict[str, float] = field(default_factory=lambda: {"track_box": 1.0, "temporal_box": 0.5})
    clip_len: int = 8
    stride: int = 1
    classes: Union[Literal["auto", "all"], list[int]] = "auto"
    min_visibility: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_len < 1 or self.stride < 1:
            raise ConfigError(f"clip_len and stride must be >= 1, got {self.clip_len}, {self.stride}")

    def load(self) -> LoadResult:
        classes: Optional[Union[str, list[int]]] = None if self.classes == "all" else self.classes
        out = LoadResult()
        for seq in mot_sequences(self.path):
            part = load_mot(seq, self.strict, classes, self.min_visibility, self.clip_len, stride=self.stride)
            out.samples += part.samples
            out.errors += part.errors
        return out

    def check_model(self, tasks: Mapping[str, int], max_frames: int) -> None:
        super().check_model(tasks, max_frames)
        if self.clip_len > max_frames:
            raise ConfigError(f"clip_len: {self.clip_len} frames, but the model reads at most {max_frames} "
                              f"(model.max_frames); set clip_len: {max_frames}")
