"""``taskmllm data export``: ShapesWorld samples written as real files, in each public dataset's own layout.

So a user can see the formats (and train on them exactly as on their own files), and the tests can train from
files. ``export(fmt, out, options)`` writes ``options.n`` scenes of ``options.split`` of ``ShapesWorld(seed)``
into the fresh folder ``out`` (atomically: a crash leaves no half-written folder):

==========  ============================================================================================
format      layout (what ``data.sources`` / ``taskmllm eval`` read)
==========  ============================================================================================
``coco``    ``annotations/instances_<split>.json`` + images ``<split>/000000.png ...`` (every object: RLE mask,
            box, its shape as category, its color and size as ``attributes``)
``refcoco``  ``instances.json`` + ``refs.json`` (one ref per object that has a unique expression, every such
            expression a sentence) + ``images/``
``mot``     ``<split>/SHAPES-0000/{seqinfo.ini, img1/000001.png ..., gt/gt.txt}`` one sequence per video (class
            names in ``seqinfo.ini``'s ``[Classes]``; occluded frames with visibility 0)
``llava``   ``llava_<split>.json`` + ``images/``: one question-answer conversation per image (caption, exist,
            color, shape, count or relation; LLaVA JSON carries no expert targets)
==========  ============================================================================================

Scene ``i`` is ``ShapesWorld(WorldConfig(image_size, num_frames), seed).image(i, split)`` (``video`` for ``mot``):
the samples a ``kind: shapesworld`` source with the same seed trains on, so reading the files back gives them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld.conversations import ConversationBuilder, ConversationConfig
from taskmllm.data.shapesworld.referring import expressions
from taskmllm.data.shapesworld.shapes import rasterize
from taskmllm.data.shapesworld.source import ALL_TASKS
from taskmllm.data.shapesworld.world import SPLITS, ShapesWorld, WorldConfig
from taskmllm.data.writers import write_coco, write_llava, write_mot_sequence, write_refcoco
from taskmllm.errors import ConfigError
from taskmllm.model.io import atomic_directory_write

FORMATS: tuple[str, ...] = ("coco", "refcoco", "mot", "llava")
#: The conversation tasks of the ``llava`` export (those without a task token).
LLAVA_TASKS: tuple[str, ...] = ("caption", "exist", "color", "shape", "count", "relation")


@dataclass(frozen=True)
class ExportOptions:
    """What to export. ``n``: scenes (images, or videos for ``mot``); ``split``: ``train``, ``val``, ``test`` or
    ``heldout``; ``seed``: the world's seed (training's ``data.seed``); ``image_size`` / ``num_frames``: the
    world's; ``image_first``: LLaVA questions put ``<image>`` before the text (LLaVA's layout) instead of after."""

    n: int = 100
    split: str = "train"
    seed: int = 0
    image_size: int = 128
    num_frames: int = 8
    image_first: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"export: n must be >= 1, got {self.n}")
        if self.split not in SPLITS:
            raise ConfigError(f"export: split {self.split!r} is not one of {list(SPLITS)}")

    def world(self) -> ShapesWorld:
        return ShapesWorld(WorldConfig(image_size=self.image_size, num_frames=self.num_frames), seed=self.seed)


@dataclass(frozen=True)
class Exported:
    """Where the export put things: ``path`` (the annotation file, or the folder of MOT sequences) and
    ``image_root`` (what the loaders take as ``image_root``; None for MOT)."""

    path: Path
    image_root: Path | None


def export(fmt: str, out: str | Path, options: ExportOptions = ExportOptions(), overwrite: bool = False) -> Exported:
    """Write ShapesWorld as ``fmt`` files into the folder ``out`` (see the module doc for the layouts).

    Raises:
        ConfigError: an unknown format, or ``out`` exists and is not empty (unless ``overwrite``: it is then
            replaced whole).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"export: {out} exists and is not empty; choose a new folder or pass --overwrite "
                          "(which replaces it whole)")
    world = options.world()
    writers = {"coco": _coco, "refcoco": _refcoco, "mot": _mot, "llava": _llava}
    rel: list[Exported] = []
    atomic_directory_write(out, lambda tmp: rel.append(writers[fmt](world, tmp, options)))
    done = rel[0]
    return Exported(out / done.path, None if done.image_root is None else out / done.image_root)


def _names(options: ExportOptions, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:06d}.png" for i in range(options.n)]


def _images(world: ShapesWorld, options: ExportOptions) -> list[Sample]:
    return [world.image(i, options.split) for i in range(options.n)]


def _coco(world: ShapesWorld, tmp: Path, options: ExportOptions) -> Exported:
    ann = Path("annotations") / f"instances_{options.split}.json"
    write_coco(_images(world, options), tmp / ann, tmp / options.split, _names(options), world.config.shapes)
    return Exported(ann, Path(options.split))


def _refcoco(world: ShapesWorld, tmp: Path, options: ExportOptions) -> Exported:
    scenes = _images(world, options)
    side = world.config.image_size
    names = [{o.id: expressions(s.objects, o, side, positional=True) for o in s.objects} for s in scenes]
    write_refcoco(scenes, names, tmp, tmp / "images", _names(options, f"{options.split}_"), world.config.shapes,
                  options.split)
    return Exported(Path("refs.json"), Path("images"))


def _mot(world: ShapesWorld, tmp: Path, options: ExportOptions) -> Exported:
    for i in range(options.n):
        video = world.video(i, options.split)
        extents, visibility = {}, {}
        for obj in video.objects:
            extents[obj.id], visibility[obj.id] = _outline(obj.polygons, obj.masks, options.image_size)
        write_mot_sequence(video, tmp / options.split / f"SHAPES-{i:04d}", list(world.config.shapes), extents,
                           visibility)
    return Exported(Path(options.split), None)


def _outline(polygons: np.ndarray, masks: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame the full outline's box (clipped to the frame) and the visible fraction of its area."""
    lo = np.clip(polygons.min(axis=1), 0, side)  # (T, 2)
    hi = np.clip(polygons.max(axis=1), 0, side)
    full = np.array([rasterize(p, side, side).sum() for p in polygons], np.float64)
    visible = masks.reshape(len(masks), -1).sum(axis=1)
    return np.concatenate([lo, hi], axis=1), np.where(full > 0, visible / np.maximum(full, 1), 0.0)


def _llava(world: ShapesWorld, tmp: Path, options: ExportOptions) -> Exported:
    builder = ConversationBuilder(ConversationConfig(question_first=not options.image_first))
    split = SPLITS[options.split]
    entries = []
    for i, name in enumerate(_names(options)):
        scene = world.image(i, options.split)
        for task in np.random.default_rng([options.seed, split, 200, i]).permutation(LLAVA_TASKS):
            rng = np.random.default_rng([options.seed, split, 100 + ALL_TASKS.index(task), i])
            sample = builder.build(scene, str(task), rng)  # what TaskSource(task)[i] writes
            if sample is not None:
                entries.append((sample, name))
                break
    path = Path(f"llava_{options.split}.json")
    write_llava(entries, tmp / path, tmp / "images")
    return Exported(path, Path("images"))
