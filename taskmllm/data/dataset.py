"""Torch datasets over sample sources, mixed by weight.

:class:`MixedDataset` maps item ``i`` deterministically (from ``seed`` and ``i``) to a source drawn with the
mixing weights, then to a sample of that source. A source is anything index-addressable that yields
:class:`~taskmllm.data.sample.Sample` - a list from a loader, another ``MixedDataset``, or a generator of samples
such as ShapesWorld's per-task sources (``taskmllm.data.shapesworld``); a source of :data:`VIRTUAL_LEN` items is
endless and item ``i`` of the mix reads its item ``i``. Items come back with pixels loaded; batches are lists of
samples (:func:`collate_samples`): the model's processor turns them into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
from torch.utils.data import Dataset

from taskmllm.data.sample import Sample
from taskmllm.errors import ConfigError

#: The length of an endless source (one that generates item ``i`` for any ``i``).
VIRTUAL_LEN = 2**31 - 1


class SampleSource(Protocol):
    """Anything with ``len`` and integer indexing that yields samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class MixedDataset(Dataset):
    """A map-style dataset of ``length`` items mixing several sources by weight.

    Args:
        sources: name (e.g. a task) -> source of samples.
        mix: name -> relative weight (sources absent from ``mix`` or with weight 0 are not drawn).
        length: number of items.
        seed: fixes which task and which source item each index gets.
    """

    def __init__(self, sources: Mapping[str, SampleSource], mix: Mapping[str, float], length: int,
                 seed: int = 0) -> None:
        negative = {t: w for t, w in mix.items() if not w >= 0}
        if negative:
            raise ConfigError(f"mixing weights must be >= 0, got {negative}")
        tasks = [t for t, w in mix.items() if w > 0]
        missing = [t for t in tasks if t not in sources]
        if missing or not tasks:
            raise ConfigError(f"mix names sources that do not exist: {missing}" if missing else
                              "empty mix: no source has a weight > 0")
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
        return task, (int(index) if n == VIRTUAL_LEN else int(rng.integers(n)))

    def __getitem__(self, index: int) -> Sample:
        task, j = self.locate(index)
        return self.sources[task][j].load()


@dataclass
class SourceSpec:
    """One source of a training stage's ``data.sources``: options every kind has; each kind (a subclass,
    registered in ``taskmllm.data.sources.SOURCE_KINDS``) adds its own and builds its samples.

    Attributes:
        kind: the registered kind (``shapesworld``, ``llava``, ``refcoco``, ``coco``, ``mot``).
        weight: relative share of the stage's samples drawn from this source.
    """

    kind: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and self.weight != float("inf")):
            raise ConfigError(f"weight must be a finite number >= 0, got {self.weight}")

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming a file or folder the source reads that does not exist."""

    def build(self, length: int, seed: int) -> SampleSource:
        """The samples: ``length`` items (or an endless source), deterministic from ``seed``."""
        raise NotImplementedError

    def label_classes(self) -> dict[str, tuple[str, ...]]:
        """Per labelling kind (``"category"``, or a key of ``ObjectGT.labels``), the classes this source's objects
        can have, in a fixed order (what an auxiliary classifier of object labels predicts)."""
        return {}

    def check_model(self, tasks: Mapping[str, int], max_frames: int) -> None:
        """Raise :class:`ConfigError` naming an option the model cannot serve (a task it has no expert for, more
        boxes than its detection queries, clips longer than its ``max_frames``). ``tasks``: the model's experts
        and their query counts."""


def collate_samples(batch: Sequence[Sample]) -> list[Sample]:
    """DataLoader ``collate_fn``: keep samples as a list (the processor makes tensors)."""
    return list(batch)
