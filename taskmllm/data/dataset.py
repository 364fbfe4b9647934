"""Torch datasets over ShapesWorld and loaded real-format samples, mixed by a ratio per task.

:class:`MixedDataset` maps item ``i`` deterministically (from ``seed`` and ``i``) to a task drawn with the
mixing ratios, then to a sample of that task's source. A source is anything index-addressable that yields
:class:`~taskmllm.data.sample.Sample` - a list from a loader, or :class:`ShapesWorldSource`, which writes
samples of one conversation task on the fly. Items come back with pixels loaded; batches are lists of
samples (:func:`collate_samples`): the model's processor turns them into tensors.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence

import numpy as np
from torch.utils.data import Dataset

from taskmllm.data.conversations import DIALOG_TASKS, IMAGE_TASKS, VIDEO_TASKS, ConversationBuilder, ConversationConfig
from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld import SPLITS, ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError

#: Default ShapesWorld mix (relative weights).
DEFAULT_MIX: Mapping[str, float] = {"caption": 1.0, "exist": 1.0, "color": 1.0, "shape": 1.0, "count": 1.0,
                                    "relation": 1.0, "seg": 2.0, "rec": 1.0, "det": 2.0, "track": 1.0,
                                    "track_box": 0.5, "temporal": 0.5}
_ALL_TASKS = IMAGE_TASKS + VIDEO_TASKS + DIALOG_TASKS
_VIRTUAL_LEN = 2**31 - 1


class SampleSource(Protocol):
    """Anything with ``len`` and integer indexing that yields samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class ShapesWorldSource:
    """Samples of one conversation ``task`` written on the fly about ShapesWorld scenes of ``split``.

    Item ``i`` is about scene ``i`` (image or video, per the task); when that scene cannot support the task
    (e.g. no object has a unique expression) the next candidate scene is used, deterministically.
    """

    def __init__(self, world: ShapesWorld, task: str, split: str = "train",
                 builder: Optional[ConversationBuilder] = None) -> None:
        if task not in _ALL_TASKS:
            raise ConfigError(f"unknown ShapesWorld task {task!r}; known: {_ALL_TASKS}")
        self.world, self.task, self.split = world, task, split
        self.builder = builder or ConversationBuilder()
        self._task_id = _ALL_TASKS.index(task)

    def __len__(self) -> int:
        return _VIRTUAL_LEN

    def __getitem__(self, index: int) -> Sample:
        video = self.task in VIDEO_TASKS
        for attempt in range(100):
            scene_index = (int(index) + attempt * 1_000_003) % _VIRTUAL_LEN
            scene = self.world.video(scene_index, self.split) if video else self.world.image(scene_index, self.split)
            rng = np.random.default_rng([self.world.seed, SPLITS[self.split], 100 + self._task_id, scene_index])
            sample = self.builder.build(scene, self.task, rng)
            if sample is not None:
                return sample
        raise ConfigError(f"no ShapesWorld scene supports task {self.task!r}; check the WorldConfig")


class MixedDataset(Dataset):
    """A map-style dataset of ``length`` items mixing several sources by task.

    Args:
        sources: task name -> source of samples of that task.
        mix: task name -> relative weight (tasks absent from ``mix`` or with weight 0 are not drawn).
        length: number of items.
        seed: fixes which task and which source item each index gets.
    """

    def __init__(self, sources: Mapping[str, SampleSource], mix: Mapping[str, float], length: int,
                 seed: int = 0) -> None:
        tasks = [t for t, w in mix.items() if w > 0]
        missing = [t for t in tasks if t not in sources]
        if missing or not tasks:
            raise ConfigError(f"mix names tasks without a source: {missing}" if missing else "empty mix")
        if any(w < 0 for w in mix.values()):
            raise ConfigError("mixing weights must be >= 0")
        empty = [t for t in tasks if len(sources[t]) == 0]
        if empty:
            raise ConfigError(f"sources without samples: {empty}")
        self.tasks = tasks
        weights = np.array([mix[t] for t in tasks], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.sources = dict(sources)
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[str, int]:
        """``(task, source index)`` of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, int(index)])
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]
        n = len(self.sources[task])
        return task, (int(index) if n == _VIRTUAL_LEN else int(rng.integers(n)))

    def __getitem__(self, index: int) -> Sample:
        task, j = self.locate(index)
        return self.sources[task][j].load()


def shapesworld_dataset(mix: Mapping[str, float] = DEFAULT_MIX, length: int = 100_000, seed: int = 0,
                        split: str = "train", config: Optional[WorldConfig] = None,
                        conversation: Optional[ConversationConfig] = None) -> MixedDataset:
    """A :class:`MixedDataset` of ShapesWorld conversations of every task in ``mix``."""
    world = ShapesWorld(config, seed=seed)
    builder = ConversationBuilder(conversation)
    sources = {t: ShapesWorldSource(world, t, split, builder) for t, w in mix.items() if w > 0}
    return MixedDataset(sources, mix, length, seed)


def collate_samples(batch: Sequence[Sample]) -> list[Sample]:
    """DataLoader ``collate_fn``: keep samples as a list (the processor makes tensors)."""
    return list(batch)
