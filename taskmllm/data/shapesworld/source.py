"""ShapesWorld as a training data source: per-task sample generators, their mix, and the ``shapesworld`` kind of a
stage's ``data.sources``.

:class:`TaskSource` writes samples of one conversation task on the fly; :func:`shapesworld_dataset` mixes
several tasks; :class:`ShapesWorldSpec` is what a stage YAML names::

    data:
      sources:
        shapes: {kind: shapesworld, image_size: 192, num_frames: 8, mix: {exist: 1.0, seg: 2.0},
                 world: {max_objects: 4}}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from taskmllm.data.dataset import VIRTUAL_LEN, MixedDataset, SourceSpec
from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld.conversations import (DIALOG_TASKS, IMAGE_TASKS, VIDEO_TASKS, ConversationBuilder,
                                                     ConversationConfig)
from taskmllm.data.shapesworld.vocab import COLORS, SHAPES, SIZES
from taskmllm.data.shapesworld.world import SPLITS, ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError
from taskmllm.schema import suggest

#: Default ShapesWorld mix (relative weights).
DEFAULT_MIX: Mapping[str, float] = {"caption": 1.0, "exist": 1.0, "color": 1.0, "shape": 1.0, "count": 1.0,
                                    "relation": 1.0, "seg": 2.0, "rec": 1.0, "det": 2.0, "track": 1.0,
                                    "track_box": 0.5, "temporal": 0.5}
ALL_TASKS = IMAGE_TASKS + VIDEO_TASKS + DIALOG_TASKS


class TaskSource:
    """Samples of one conversation ``task`` written on the fly about ShapesWorld scenes of ``split``.

    Item ``i`` is about scene ``i`` (image or video, per the task); when that scene cannot support the task
    (e.g. no object has a unique expression) the next candidate scene is used, deterministically.
    """

    def __init__(self, world: ShapesWorld, task: str, split: str = "train",
                 builder: Optional[ConversationBuilder] = None) -> None:
        if task not in ALL_TASKS:
            raise ConfigError(f"unknown ShapesWorld task {task!r}; known: {ALL_TASKS}")
        self.world, self.task, self.split = world, task, split
        self.builder = builder or ConversationBuilder()
        self._task_id = ALL_TASKS.index(task)

    def __len__(self) -> int:
        return VIRTUAL_LEN

    def __getitem__(self, index: int) -> Sample:
        video = self.task in VIDEO_TASKS
        for attempt in range(100):
            scene_index = (int(index) + attempt * 1_000_003) % VIRTUAL_LEN
            scene = self.world.video(scene_index, self.split) if video else self.world.image(scene_index, self.split)
            rng = np.random.default_rng([self.world.seed, SPLITS[self.split], 100 + self._task_id, scene_index])
            sample = self.builder.build(scene, self.task, rng)
            if sample is not None:
                return sample
        raise ConfigError(f"no ShapesWorld scene supports task {self.task!r}; check the WorldConfig")


def shapesworld_dataset(mix: Mapping[str, float] = DEFAULT_MIX, length: int = 100_000, seed: int = 0,
                        split: str = "train", config: Optional[WorldConfig] = None,
                        conversation: Optional[ConversationConfig] = None) -> MixedDataset:
    """A :class:`MixedDataset` of ShapesWorld conversations of every task in ``mix``."""
    world = ShapesWorld(config, seed=seed)
    builder = ConversationBuilder(conversation)
    sources = {t: TaskSource(world, t, split, builder) for t, w in mix.items() if w > 0}
    return MixedDataset(sources, mix, length, seed)


@dataclass
class ShapesWorldSpec(SourceSpec):
    """The ``shapesworld`` kind of ``data.sources``: scenes generated on the fly (world seed = ``data.seed``).

    Attributes:
        split: ``train`` (default), ``val``, ``test`` or ``heldout``.
        image_size, num_frames: side of the images and frames per video.
        mix: conversation task -> relative weight (:data:`DEFAULT_MIX`).
        world: further :class:`WorldConfig` fields, e.g. ``{max_objects: 1}`` for one-object scenes.
        question_first: where the questions put the visual placeholder: None (default) writes none, so the
            model's processor places it where the model sees it (``tokens.image_first``, as for every source);
            True / False fix the question before / after it whatever the model.
    """

    split: str = "train"
    image_size: int = 128
    num_frames: int = 8
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    world: dict[str, Any] = field(default_factory=dict)
    question_first: Optional[bool] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in SPLITS:
            raise ConfigError(f"split {self.split!r}{suggest(self.split, list(SPLITS))}; known: {list(SPLITS)}")
        for task, weight in self.mix.items():
            if task not in ALL_TASKS:
                raise ConfigError(f"mix: unknown ShapesWorld task {task!r}{suggest(task, ALL_TASKS)}; "
                                  f"known: {', '.join(ALL_TASKS)}")
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"mix.{task}: a weight must be a finite number >= 0, got {weight}")
        if self.mix and not any(w > 0 for w in self.mix.values()):
            raise ConfigError(f"mix: every weight is 0 ({self.mix}); give at least one task a weight > 0")
        self.world_config()

    def world_config(self) -> WorldConfig:
        """The :class:`WorldConfig` of ``image_size``, ``num_frames`` and ``world``.

        Raises:
            ConfigError: an unknown ``world`` key (with the closest match), ``image_size`` / ``num_frames`` given
                there, or a value ``WorldConfig`` rejects.
        """
        known = [f.name for f in dataclasses.fields(WorldConfig) if f.name not in ("image_size", "num_frames")]
        for key in self.world:
            if key in ("image_size", "num_frames"):
                raise ConfigError(f"world.{key}: set {key} beside world instead")
            if key not in known:
                raise ConfigError(f"world: unknown key {key!r}{suggest(key, known)}; known: {', '.join(known)}")
        world = {k: _tuples(v) for k, v in self.world.items()}
        try:
            return WorldConfig(image_size=self.image_size, num_frames=self.num_frames, **world)
        except (ConfigError, TypeError, ValueError) as err:  # TypeError: a value of the wrong type
            raise ConfigError(f"world: {err}") from err

    def build(self, length: int, seed: int) -> MixedDataset:
        return shapesworld_dataset(self.mix, length, seed, self.split, self.world_config(),
                                   ConversationConfig(question_first=self.question_first))

    def label_classes(self) -> dict[str, tuple[str, ...]]:
        return {"category": tuple(SHAPES), "color": tuple(COLORS), "size": tuple(SIZES)}


def _tuples(value: Any) -> Any:
    """YAML lists -> tuples (WorldConfig's sequence fields are tuples, nested for pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
