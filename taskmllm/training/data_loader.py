"""The training data pipeline: a ``torch.utils.data.DataLoader`` over the stage's dataset.

- **Order and sharding.** Micro-batch ``p`` of rank ``r`` (of ``w``) holds the samples at global positions
  ``(p*w + r)*bs ... +bs`` of an endless stream that visits the dataset epoch after epoch, each epoch in its own
  seeded permutation (:func:`epoch_order`). The order is a pure function of ``(seed, position)``: the ranks
  split each global batch between them, and 2 ranks read exactly the micro-batches 2p and 2p+1 of one process.
- **Resume.** The loader starts at a micro-batch position (``state["data_position"]`` of a checkpoint), so a
  resumed run reads the next unseen samples, the same ones an uninterrupted run reads.
- **Workers.** ``data.workers`` processes load the samples (ShapesWorld renders them) and run the processor
  (tokenization, pixels) into a :class:`MicroBatch`; a sample depends only on its index, so the worker count
  changes nothing but speed. On CUDA the batches come in pinned memory and move with ``non_blocking=True``.
- **Groups.** A micro-batch holds its images, its text-only samples and its videos as separate groups, each one
  padded batch (LLaVA's modality grouping, inside the micro-batch): padding images to a video's length would cost
  about 4x the compute; padding them to a text replay answer's length cost smol's `see` 19% more token positions
  than the text apart. The trainee recombines the groups' losses with the weights one forward of the whole
  micro-batch gives them, so the grouping changes the speed, not the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from taskmllm.data.sample import Sample
from taskmllm.experts.base import TaskTarget
from taskmllm.model.processor import IGNORE, Batch

#: the array fields of a TaskTarget (numpy in a sample, CPU tensors in a micro-batch)
TARGET_ARRAYS = ("mask", "boxes", "visible", "prompt_box")
#: datasets longer than this draw their per-epoch order from a multiplicative hash instead of a permutation
PERMUTE_UP_TO = 1_000_000


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of ``range(n)`` for one epoch (computed once per epoch, not per sample)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch_indices(n: int, batch_size: int, seed: int, position: int, rank: int, world: int) -> list[int]:
    """Dataset indices of micro-batch ``position`` of ``rank``: a seeded permutation per epoch, sliced by rank."""
    start = (position * world + rank) * batch_size
    out = []
    for g in range(start, start + batch_size):
        epoch, i = divmod(g, n)
        if n <= PERMUTE_UP_TO:
            out.append(int(epoch_order(seed, epoch, n)[i]))
        else:
            out.append((i * 2654435761 + epoch) % n)
    return out


class MicroBatchSampler(Sampler[list[int]]):
    """Endless batch sampler: the indices of micro-batches ``start``, ``start + 1``, ... of one rank."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield micro_batch_indices(self.n, self.batch_size, self.seed, position, self.rank, self.world)
            position += 1


# ------------------------------------------------------------------------------------------ micro-batches
@dataclass
class Group:
    """One padded forward of a micro-batch.

    Attributes:
        batch: the processor's :class:`Batch` of every turn of the samples.
        targets: per sample, its expert targets in task-token order (arrays as CPU tensors).
        samples: the samples themselves (auxiliary losses read their ground truth).
        tokens: supervised LM tokens of the batch (counted on the host).
    """

    batch: Batch
    targets: list[list[TaskTarget]]
    samples: list[Sample]
    tokens: int


@dataclass
class MicroBatch:
    """What one rank trains on in one micro-batch: its groups and the dataset indices they came from."""

    groups: list[Group]
    indices: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(g.samples) for g in self.groups)

    def pin_memory(self) -> "MicroBatch":
        """Page-locked copies of every tensor (the DataLoader calls this on CUDA with ``pin_memory=True``)."""
        return MicroBatch([dataclasses.replace(g, batch=_map_batch(g.batch, lambda t: t.pin_memory()),
                                               targets=[[_map_target(t, lambda x: x.pin_memory()) for t in ts]
                                                        for ts in g.targets]) for g in self.groups],
                          list(self.indices))

    def to(self, device: torch.device) -> "MicroBatch":
        """The batches on ``device`` (asynchronous from pinned memory; the host copies stay reachable through
        ``Batch.host`` for host-side indexing). Targets stay on the host: each expert checks them there and moves
        them itself."""
        return MicroBatch([dataclasses.replace(g, batch=g.batch.to(device, non_blocking=True))
                           for g in self.groups], list(self.indices))


def _map_batch(batch: Batch, fn) -> Batch:
    tensors = {f: getattr(batch, f) for f in ("input_ids", "attention_mask", "labels", "pixel_values")}
    return dataclasses.replace(batch, **{k: None if v is None else fn(v) for k, v in tensors.items()})


def _map_target(target: TaskTarget, fn) -> TaskTarget:
    return dataclasses.replace(target, **{k: fn(getattr(target, k)) for k in TARGET_ARRAYS
                                          if isinstance(getattr(target, k), torch.Tensor)})


def _as_tensor(value: Any) -> Any:
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


class Collate:
    """DataLoader ``collate_fn``: ``[(index, sample), ...]`` -> :class:`MicroBatch` through the model's processor.

    ``split``: images, text-only samples and videos as up to three groups (False: one group of everything)."""

    def __init__(self, processor, split: bool = True) -> None:
        self.processor, self.split = processor, split

    def __call__(self, items: Sequence[tuple[int, Sample]]) -> MicroBatch:
        samples = [s for _, s in items]
        kinds = ([s for s in samples if s.frames is None and s.image is not None],
                 [s for s in samples if s.frames is None and s.image is None],
                 [s for s in samples if s.frames is not None])
        groups = [g for g in kinds if g] if self.split else [samples]
        return MicroBatch([self.group(g) for g in groups], [i for i, _ in items])

    def text_with_visuals(self, micro: MicroBatch) -> MicroBatch:
        """``micro`` with its text-only group (if any) merged into its first group with pixels, for engines whose
        ranks must all run the same modules on every forward (a text-only forward runs no vision module)."""
        visual = [g for g in micro.groups if g.batch.pixel_values is not None]
        text = [g for g in micro.groups if g.batch.pixel_values is None]
        if not visual or not text:
            return micro
        first = self.group([s for g in [visual[0], *text] for s in g.samples])
        return MicroBatch([first, *visual[1:]], micro.indices)

    def group(self, samples: Sequence[Sample]) -> Group:
        """One padded batch of ``samples`` with every turn supervised, and their targets as tensors."""
        visuals = [s.frames if s.frames is not None else s.image for s in samples]
        batch = self.processor.conversations([s.turns for s in samples], visuals)
        targets = [[dataclasses.replace(t, **{k: _as_tensor(getattr(t, k)) for k in TARGET_ARRAYS})
                    for t in s.targets] for s in samples]
        tokens = int((batch.labels[:, 1:] != IGNORE).sum())
        return Group(batch, targets, list(samples), tokens)


class Indexed(Dataset):
    """``dataset[i]`` as ``(i, dataset[i])``, so a micro-batch knows the indices it came from."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        return index, self.dataset[index]


def build_loader(dataset, processor, batch_size: int, seed: int, rank: int, world: int, start: int,
                 workers: int = 0, pin_memory: bool = False, split: bool = True,
                 prefetch: Optional[int] = None) -> DataLoader:
    """An endless DataLoader of :class:`MicroBatch` objects of one rank, from micro-batch position ``start``.

    Args:
        dataset: the stage's samples (index -> :class:`Sample`).
        processor: the model's processor (runs in the workers).
        batch_size: samples per micro-batch and rank; seed: fixes the per-epoch order.
        rank, world: this process and the number of processes.
        start: the first micro-batch position (0, or a checkpoint's ``data_position``).
        workers: loader processes (0: load in the training process).
        pin_memory: page-locked batches (on CUDA).
        split: images and videos as separate groups.
        prefetch: micro-batches each worker loads ahead (DataLoader's ``prefetch_factor``; default 2).
    """
    sampler = MicroBatchSampler(len(dataset), batch_size, seed, rank, world, start)
    extra = {"prefetch_factor": prefetch or 2, "persistent_workers": False} if workers else {}
    return DataLoader(Indexed(dataset), batch_sampler=sampler, collate_fn=Collate(processor, split),
                      num_workers=workers, pin_memory=pin_memory, **extra)
