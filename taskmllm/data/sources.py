"""The data-source kinds a training stage can name in ``data.sources`` (a plain dict registry).

A stage's data is a mapping of named sources, each ``{kind: ..., weight: ..., <the kind's options>}``, parsed
strictly by its kind's :class:`~taskmllm.data.dataset.SourceSpec` subclass and mixed by weight::

    data:
      sources:
        shapes: {kind: shapesworld, mix: {seg: 2.0, det: 1.0}}
        chat: {kind: llava, path: llava_instruct.json, image_root: images/, weight: 0.5}
        refs: {kind: refcoco, path: refs.json, instances: instances.json, image_root: images/}

Kinds: ``shapesworld`` (generated), ``llava`` (conversation JSON), ``refcoco`` / ``coco`` / ``mot`` (annotation
files, :mod:`taskmllm.data.annotated`). Mixing: every item of the stage draws its source with the weights,
independently (deterministic from ``data.seed`` and the item's index), so each source's share of the samples is its
weight's share in expectation: over many steps exactly, within one batch up to binomial noise (a batch of 128 holds
a 50% source's samples 64 ± 6 times). Batches are drawn from a seeded permutation of the items, so a per-batch
quota would need a batch sampler; the expectation is what a weighted mixture means in TPO's and LLaVA's recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from taskmllm.data.annotated import CocoSpec, MotSpec, RefcocoSpec
from taskmllm.data.dataset import MixedDataset, SampleSource, SourceSpec
from taskmllm.data.formats import load_llava
from taskmllm.data.shapesworld.source import ShapesWorldSpec
from taskmllm.errors import ConfigError
from taskmllm.schema import from_dict, suggest


@dataclass
class LlavaSpec(SourceSpec):
    """The ``llava`` kind: a LLaVA conversation JSON (or JSON lines) file.

    Attributes:
        path: the JSON file.
        image_root: the folder its ``image`` / ``video`` paths are relative to.
    """

    path: str = ""
    image_root: str = ""

    def check_files(self) -> None:
        if not self.path or not Path(self.path).is_file():
            raise ConfigError(f"path: {self.path!r} does not exist")
        if self.image_root and not Path(self.image_root).is_dir():
            raise ConfigError(f"image_root: {self.image_root!r} is not a directory")

    def build(self, length: int, seed: int) -> MixedDataset:
        samples = load_llava(self.path, self.image_root or None).samples
        return MixedDataset({"llava": samples}, {"llava": 1.0}, length, seed)


#: kind -> its spec class
SOURCE_KINDS: dict[str, type[SourceSpec]] = {"shapesworld": ShapesWorldSpec, "llava": LlavaSpec,
                                             "refcoco": RefcocoSpec, "coco": CocoSpec, "mot": MotSpec}


def parse_sources(raw: Mapping[str, Any], where: str = "data.sources") -> dict[str, SourceSpec]:
    """Each named source's spec, strictly typed by its kind.

    Raises:
        ConfigError: no source, a source without a known ``kind``, or a bad option (the message names it).
    """
    if not raw:
        raise ConfigError(f"{where}: no data source; name at least one, e.g. {{shapes: {{kind: shapesworld}}}}")
    specs = {}
    for name, options in raw.items():
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.{name}: expected a mapping with a 'kind', got {options!r}")
        kind = options.get("kind")
        if kind not in SOURCE_KINDS:
            raise ConfigError(f"{where}.{name}.kind: {kind!r}{suggest(str(kind), list(SOURCE_KINDS))} is not a "
                              f"data-source kind; known: {', '.join(SOURCE_KINDS)}")
        specs[name] = from_dict(SOURCE_KINDS[kind], options, f"{where}.{name}")
    return specs


def build_dataset(specs: Mapping[str, SourceSpec], length: int, seed: int) -> SampleSource:
    """The stage's samples: one source as it is, several mixed by ``weight`` (sources of weight 0 are skipped).

    Raises:
        ConfigError: every source has weight 0.
    """
    if not any(s.weight > 0 for s in specs.values()):
        raise ConfigError("data.sources: every source has weight 0; give one a weight > 0")
    used = {n: s for n, s in specs.items() if s.weight > 0}  # a source of weight 0 is not even read
    if len(used) == 1:
        return next(iter(used.values())).build(length, seed)
    return MixedDataset({n: s.build(length, seed) for n, s in used.items()},
                        {n: s.weight for n, s in used.items()}, length, seed)


def label_classes(specs: Mapping[str, SourceSpec]) -> dict[str, tuple[str, ...]]:
    """Per labelling kind, the classes of every source (first appearance order)."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs.values():
        for kind, classes in spec.label_classes().items():
            out[kind] = tuple(dict.fromkeys(out.get(kind, ()) + tuple(classes)))
    return out


def check_model_fit(specs: Mapping[str, SourceSpec], tasks: Mapping[str, int], max_frames: int,
                    where: str = "data.sources") -> None:
    """Every source's :meth:`~taskmllm.data.dataset.SourceSpec.check_model` against the model's experts (task ->
    query count) and frame budget.

    Raises:
        ConfigError: naming the source and its option the model cannot serve.
    """
    for name, spec in specs.items():
        try:
            spec.check_model(tasks, max_frames)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{name}.{exc}") from exc
