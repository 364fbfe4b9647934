"""Expert calls cached once from a frozen MLLM, so a stage that trains the experts alone costs the experts alone.

When nothing upstream of the experts trains (vision, projector, LLM and queries frozen, no LM or auxiliary loss),
the inputs of every expert call — its query states, the vision features and LLM visual-token states of its frames,
its phrase and its target — are a fixed function of the sample. ``stage.cached_calls: N`` runs the frozen MLLM once
(teacher-forced, without autograd, in eval mode) over the stage's first N samples of this rank and keeps every
call; each training step then draws ``data.batch_size`` calls from the cache (an epoch-seeded permutation, a pure
function of ``(seed, position)``) and runs only the experts. Each rank's cache is also written to a file keyed by
what it was built from, which a resumed run, or another run on the same frozen model and data, reads back. The calls are grouped as :func:`~taskmllm.router.dispatch.run_calls` groups them (per expert,
per frame count), and each run's loss is weighted as in ``JointModel.forward``: a cached step's loss is the live
step's loss on the same calls (tested). Linear probing on frozen features, applied to the experts of a trained
MLLM: ``bench/seg_probe.py`` showed SAM's decoder needs far more passes over smol's states than a live stage
gives it at the same cost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.experts.base import ExpertPrompt, TaskTarget, VisionFeatures
from taskmllm.router.dispatch import call_features
from taskmllm.router.joint import match_targets
from taskmllm.training.data_loader import TARGET_ARRAYS, micro_batch_indices

log = logging.getLogger(__name__)

#: the tensor fields of a :class:`CachedCall`, in its constructor's order
CALL_TENSORS = ("queries", "features", "context", "pixels")


@dataclass
class CachedCall:
    """One expert call's inputs and target, on the host.

    Attributes:
        task: the expert's name.
        queries: ``(K, H)`` the call's query states.
        features: ``(T, N, C)`` vision features of the frames the expert reads (T = 1 for an image expert).
        context: ``(T, N', H)`` the LLM's last-layer states at those frames' visual tokens, or None.
        pixels: ``(T, 3, S, S)`` the frames as the tower saw them, for an expert that reads pixels, or None.
        phrase: the call's ``<ref>`` phrase, or None.
        target: its ground truth (arrays as CPU tensors).
    """

    task: str
    queries: torch.Tensor
    features: torch.Tensor
    context: Optional[torch.Tensor]
    pixels: Optional[torch.Tensor]
    phrase: Optional[str]
    target: TaskTarget


@dataclass
class CachedRun:
    """One batched expert forward of a cached micro-batch (calls of one expert with one frame count).

    ``group_size``: the expert's calls in the micro-batch (this run's loss weighs ``len(targets) / group_size``);
    ``placeholder``: a zero-weight run on one cached call, for an expert the draw left without a call (every
    expert runs on every step, as data-parallel engines need)."""

    task: str
    queries: torch.Tensor
    features: VisionFeatures
    prompts: list[ExpertPrompt]
    targets: list[TaskTarget]
    group_size: int
    placeholder: bool = False

    def to(self, device: torch.device) -> "CachedRun":
        f = self.features
        moved = dataclasses.replace(f, **{k: getattr(f, k).to(device, non_blocking=True)
                                          for k in ("features", "context", "pixels") if getattr(f, k) is not None})
        return dataclasses.replace(self, queries=self.queries.to(device, non_blocking=True), features=moved)


@dataclass
class CachedBatch:
    """A micro-batch drawn from a :class:`CallCache`: its runs in the model's expert order, and the cache rows."""

    runs: list[CachedRun]
    indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device) -> "CachedBatch":
        return CachedBatch([r.to(device) for r in self.runs], list(self.indices))


class CallCache:
    """The cached calls of one rank and the geometry of their features (see the module docstring)."""

    def __init__(self, calls: Sequence[CachedCall], tasks: Sequence[str], grid: tuple[int, int], image_size: int,
                 visual_grid: Optional[tuple[int, int]]) -> None:
        missing = [t for t in tasks if not any(c.task == t for c in calls)]
        if missing:
            raise ConfigError(f"stage.cached_calls: the cached samples hold no call for experts {missing}; give "
                              f"them data (data.sources) or weight 0 (stage.expert_weights)")
        self.calls, self.tasks = list(calls), list(tasks)
        self.grid, self.image_size, self.visual_grid = grid, image_size, visual_grid
        self.stats: dict = {}  # what building it took (:meth:`build`)

    def __len__(self) -> int:
        return len(self.calls)

    def counts(self) -> dict[str, int]:
        """Cached calls per expert."""
        return {t: sum(c.task == t for c in self.calls) for t in self.tasks}

    @classmethod
    def build(cls, joint: nn.Module, loader: Iterator, samples: int, tasks: Sequence[str],
              progress: bool = False, parts: Optional["CacheParts"] = None,
              state: Optional["BuildState"] = None) -> "CallCache":
        """Run ``joint``'s frozen MLLM over ``loader``'s micro-batches until ``samples`` samples are read and keep
        the calls of ``tasks`` (in the model's expert order). The MLLM runs in eval mode, without autograd.

        ``state``: what an interrupted build had done (:meth:`CacheParts.resume`; ``loader`` then starts at its
        micro-batch ``state.position``); ``parts``: where the calls are saved as they accumulate."""
        from tqdm.auto import tqdm

        mllm, experts = joint.mllm, joint.experts
        state = state or BuildState()
        was_training, start, resumed_at = mllm.training, time.perf_counter(), state.seen
        mllm.eval()
        bar = tqdm(total=samples, initial=state.seen, disable=not progress, desc="caching calls")
        try:
            while state.seen < samples:
                micro = next(loader).to(mllm.device)
                for group in micro.groups:
                    state.calls += _group_calls(joint, group, tasks)
                state.seen, state.position = state.seen + micro.size, state.position + 1
                bar.update(micro.size)
                if parts is not None:
                    parts.save(state, state.seconds + time.perf_counter() - start)
        finally:
            bar.close()
            mllm.train(was_training)
        cache = cls(state.calls, [t for t in experts if t in tasks], mllm.vision.grid, mllm.config.vision.image_size,
                    mllm.grid)
        cache.stats = {"samples": state.seen, "calls": cache.counts(),
                       "seconds": round(state.seconds + time.perf_counter() - start, 1),
                       "megabytes": round(cache.nbytes() / 2**20, 1)}
        if resumed_at:
            cache.stats["resumed_at_sample"] = resumed_at
        log.info("call cache: %s", cache.stats)
        return cache

    def nbytes(self) -> int:
        """Bytes of the cached tensors."""
        return sum(t.numel() * t.element_size() for c in self.calls
                   for t in (getattr(c, n) for n in CALL_TENSORS) if t is not None)

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: Path, key: str) -> Path:
        """Write the cache to ``path`` (safetensors: the tensors, and in its metadata ``key``, the geometry, each
        call's task and phrase and its target's task and phrase), atomically."""
        meta = {"key": key, "tasks": json.dumps(self.tasks), "stats": json.dumps(self.stats),
                "geometry": json.dumps([list(self.grid), self.image_size,
                                        None if self.visual_grid is None else list(self.visual_grid)])}
        return write_calls(path, self.calls, meta)

    @classmethod
    def load(cls, path: Path, key: str) -> Optional["CallCache"]:
        """The cache saved at ``path`` for ``key``, or None (no file, or one written for another model, data,
        count or set of experts)."""
        read = read_calls(path, key)
        if read is None:
            return None
        calls, meta = read
        grid, image_size, visual_grid = json.loads(meta["geometry"])
        cache = cls(calls, json.loads(meta["tasks"]), tuple(grid), image_size,
                    None if visual_grid is None else tuple(visual_grid))
        cache.stats = {**json.loads(meta["stats"]), "loaded_from": str(path)}
        return cache

    def batches(self, batch_size: int, seed: int, start: int) -> Iterator[CachedBatch]:
        """Micro-batches ``start``, ``start + 1``, ... of ``batch_size`` calls (epoch-seeded permutations)."""
        position = start
        while True:
            yield self.batch(micro_batch_indices(len(self.calls), batch_size, seed, position, 0, 1))
            position += 1

    def batch(self, rows: Sequence[int]) -> CachedBatch:
        """The runs of cache rows ``rows``: per expert (the model's order) and frame count, in row order; an
        expert without a row gets a placeholder run on its first cached call."""
        runs = []
        for task in self.tasks:
            mine = [self.calls[i] for i in rows if self.calls[i].task == task]
            if not mine:
                first = next(c for c in self.calls if c.task == task)
                runs.append(dataclasses.replace(self._run(task, [first], 1), targets=[], placeholder=True))
                continue
            by_frames: dict[int, list[CachedCall]] = {}
            for c in mine:
                by_frames.setdefault(c.features.shape[0], []).append(c)
            runs += [self._run(task, same, len(mine)) for _, same in sorted(by_frames.items())]
        return CachedBatch(runs, list(rows))

    def _run(self, task: str, calls: Sequence[CachedCall], group_size: int) -> CachedRun:
        def stacked(key: str) -> Optional[torch.Tensor]:
            values = [getattr(c, key) for c in calls]
            return None if values[0] is None else torch.stack(values)

        features = VisionFeatures(stacked("features"), self.grid, self.image_size, stacked("context"),
                                  self.visual_grid, stacked("pixels"))
        return CachedRun(task, stacked("queries"), features, [ExpertPrompt(c.phrase) for c in calls],
                         [c.target for c in calls], group_size)


def write_calls(path: Path, calls: Sequence[CachedCall], meta: dict[str, str]) -> Path:
    """``calls`` to the safetensors file ``path`` (their tensors; in the metadata ``meta`` and each call's task,
    phrase and target task and phrase), atomically."""
    from safetensors.torch import save_file

    tensors, rows = {}, []
    for i, c in enumerate(calls):
        for name in CALL_TENSORS:
            if getattr(c, name) is not None:
                tensors[f"{i}.{name}"] = getattr(c, name).contiguous()
        for name in TARGET_ARRAYS:
            if getattr(c.target, name) is not None:
                tensors[f"{i}.target.{name}"] = torch.as_tensor(getattr(c.target, name)).contiguous()
        rows.append([c.task, c.phrase, c.target.task, c.target.phrase])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata={**meta, "calls": json.dumps(rows)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_calls(path: Path, key: str) -> Optional[tuple[list[CachedCall], dict[str, str]]]:
    """The calls :func:`write_calls` wrote to ``path`` and its metadata, or None (no file, or another ``key``)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        names = set(f.keys())

        def get(name: str) -> Optional[torch.Tensor]:
            return f.get_tensor(name) if name in names else None

        calls = []
        for i, (task, phrase, target_task, target_phrase) in enumerate(json.loads(meta["calls"])):
            target = TaskTarget(target_task, target_phrase, **{n: get(f"{i}.target.{n}") for n in TARGET_ARRAYS})
            calls.append(CachedCall(task, *(get(f"{i}.{n}") for n in CALL_TENSORS), phrase, target))
    return calls, meta


@dataclass
class BuildState:
    """How far a cache build got: its calls, the samples read, the next micro-batch position, the seconds spent."""

    calls: list[CachedCall] = field(default_factory=list)
    seen: int = 0
    position: int = 0
    seconds: float = 0.0


class CacheParts:
    """A cache build saved as it grows, so that a killed build (a 20-40 minute phase on a CPU) resumes instead of
    starting over: every ``every_s`` seconds the calls added since the last part go to
    ``<folder>/<stem>.<key[:16]>.part-<k>.safetensors`` with the position reached; :meth:`resume` reads this key's
    parts back in order, and :meth:`clear` deletes them once the whole cache is saved. Parts of another key (another
    model or data) are never read nor touched."""

    def __init__(self, folder: Path, stem: str, key: str, every_s: float = 300.0) -> None:
        self.folder, self.key, self.every_s = Path(folder), key, every_s
        self.prefix = f"{stem}.{key[:16]}.part-"
        self.saved, self.count, self.last = 0, 0, time.perf_counter()

    def files(self) -> list[Path]:
        """This key's parts, in the order they were written."""
        return sorted(self.folder.glob(f"{self.prefix}*.safetensors")) if self.folder.is_dir() else []

    def resume(self) -> BuildState:
        """The state the parts reach (an empty state when there are none)."""
        state = BuildState()
        for path in self.files():
            read = read_calls(path, self.key)
            if read is None:
                break
            calls, meta = read
            state.calls += calls
            state.seen, state.position, state.seconds = (int(meta["seen"]), int(meta["position"]),
                                                        float(meta["seconds"]))
            self.count += 1
        self.saved = len(state.calls)
        if self.count:
            log.info("call cache: resuming at sample %d (micro-batch %d) from %d parts", state.seen, state.position,
                     self.count)
        return state

    def save(self, state: BuildState, seconds: float) -> Optional[Path]:
        """Write the calls added since the last part, if ``every_s`` seconds have passed since the last one."""
        if time.perf_counter() - self.last < self.every_s:
            return None
        path = self.folder / f"{self.prefix}{self.count:05d}.safetensors"
        write_calls(path, state.calls[self.saved:], {"key": self.key, "seen": str(state.seen),
                                                     "position": str(state.position), "seconds": repr(float(seconds))})
        self.saved, self.count, self.last = len(state.calls), self.count + 1, time.perf_counter()
        return path

    def clear(self) -> None:
        """Delete this key's parts."""
        for path in self.files():
            path.unlink(missing_ok=True)


def _group_calls(joint: nn.Module, group, tasks: Sequence[str]) -> list[CachedCall]:
    """The calls of ``tasks`` in one group of a micro-batch, their inputs copied to the host (no view keeps the
    batch's tensors alive)."""
    with torch.no_grad():
        out = joint.mllm(group.batch, "none")
    host = group.batch.on_host()
    routed = joint.router.route(host.input_ids, out.hidden_states, host.attention_mask)
    targets = match_targets(routed, group.targets)
    kept = []
    for call in routed:
        if call.task not in tasks:
            continue
        f = call_features(joint.experts[call.task], [call], out.expert_inputs)  # (1, T, ...) each
        kept.append(CachedCall(call.task, call.query_states.detach().to("cpu", copy=True), host_copy(f.features),
                               host_copy(f.context), host_copy(f.pixels), call.phrase,
                               targets[id(call)]))  # a micro-batch's targets stay on the host
    return kept


def host_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Row 0 of ``t`` as its own CPU tensor (None stays None)."""
    return None if t is None else t[0].detach().to("cpu", copy=True)


def check_cacheable(stage) -> None:
    """Raise :class:`ConfigError` unless ``stage`` trains the experts alone (what ``stage.cached_calls`` needs)."""
    upstream = sorted(k for k, m in stage.trainable.items() if m != "frozen" and k.split(".", 1)[0] != "experts")
    why = [f"trains {', '.join(upstream)}" if upstream else "",
           f"has lm_weight {stage.lm_weight}" if stage.lm_weight else "",
           f"has auxiliary losses {sorted(stage.aux)}" if stage.aux else "",
           f"calibrates gradients ({stage.grad_calibration})" if stage.grad_calibration != "none" else ""]
    why = [w for w in why if w]
    if why:
        raise ConfigError(f"stage.cached_calls caches the inputs of a frozen MLLM for the experts alone, but stage "
                          f"{stage.name!r} {'; '.join(why)}: set stage.cached_calls: 0 or train the experts alone")
