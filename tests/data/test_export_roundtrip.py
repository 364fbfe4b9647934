"""`taskmllm data export` writes ShapesWorld in each public format; reading the files back gives the in-memory samples.

Oracles: the in-memory ShapesWorld scenes themselves (masks, boxes, categories, labels, referring expressions,
tracks, visibility, pixels) and pycocotools reading the exported COCO file on its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from taskmllm.cli import main
from taskmllm.data.coco import load_coco, load_refs, referred
from taskmllm.data.formats import load_llava
from taskmllm.data.mot import load_mot, mot_sequences
from taskmllm.data.shapesworld import ConversationBuilder, ShapesWorld, TaskSource, WorldConfig
from taskmllm.data.shapesworld.export import ExportOptions, export
from taskmllm.data.shapesworld.referring import expressions
from taskmllm.errors import ConfigError

OPTIONS = ExportOptions(n=6, split="val", seed=3, image_size=64, num_frames=4)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(WorldConfig(image_size=64, num_frames=4), seed=3)


def _same_object(got, want):
    assert got.category == want.category
    assert np.array_equal(got.mask, want.mask)
    assert np.array_equal(got.box, want.box)
    assert got.area == want.area
    assert got.labels == {"color": want.color, "size": want.size}


def test_coco_round_trip(tmp_path, world):
    done = export("coco", tmp_path / "coco", OPTIONS)
    scenes = load_coco(done.path, done.image_root).samples
    lazy = load_coco(done.path, done.image_root, lazy_masks=True).samples  # what training sources keep: RLE
    assert len(scenes) == OPTIONS.n
    for eager, compressed in zip(scenes, lazy):
        for a, b in zip(eager.objects, compressed.objects):
            assert b.mask is None and np.array_equal(b.mask_array(), a.mask) and a.area == b.area
    oracle = COCO(str(done.path))  # pycocotools reads the file on its own: the same masks
    for i, scene in enumerate(scenes):
        want = world.image(i, "val")
        assert np.array_equal(scene.load().image, want.image)
        assert len(scene.objects) == len(want.objects)
        for got, obj in zip(scene.objects, want.objects):
            _same_object(got, obj)
            assert np.array_equal(oracle.annToMask(oracle.anns[got.id]).astype(bool), obj.mask)
    assert sorted(c["name"] for c in oracle.dataset["categories"]) == sorted(world.config.shapes)


def test_refcoco_round_trip(tmp_path, world):
    done = export("refcoco", tmp_path / "refcoco", OPTIONS)
    refs = load_refs(tmp_path / "refcoco" / "instances.json", done.path, done.image_root, split="val").samples
    expected = []
    for i in range(OPTIONS.n):
        scene = world.image(i, "val")
        for obj in scene.objects:
            names = expressions(scene.objects, obj, 64, positional=True)
            if names:
                expected.append((i, obj, names))
    assert len(refs) == len(expected) > OPTIONS.n  # at least one ref per image, most objects have one
    for ref, (i, obj, names) in zip(refs, expected):
        assert ref.meta["sentences"] == names  # the phrases
        assert ref.meta["split"] == "val"
        _same_object(referred(ref), obj)
        assert np.array_equal(ref.load().image, world.image(i, "val").image)


def test_mot_round_trip(tmp_path):
    options = ExportOptions(n=6, split="val", seed=0, image_size=64, num_frames=8)  # video 5 has occluded frames
    world = ShapesWorld(WorldConfig(image_size=64, num_frames=8), seed=0)
    done = export("mot", tmp_path / "mot", options)
    sequences = mot_sequences(done.path)
    assert [s.name for s in sequences] == [f"SHAPES-{i:04d}" for i in range(options.n)]
    for i, seq in enumerate(sequences):
        (clip,) = load_mot(seq).samples
        want = world.video(i, "val")
        assert np.array_equal(clip.load().frames, want.frames)
        tracks = {o.id: o for o in clip.objects}
        assert sorted(tracks) == [o.id + 1 for o in want.objects]  # MOT ids start at 1
        for obj in want.objects:
            got = tracks[obj.id + 1]
            assert got.category == obj.category
            assert np.array_equal(got.boxes, obj.boxes)
            assert np.array_equal(got.visible, obj.visible) and np.array_equal(got.present, obj.present)
            assert got.interval == obj.interval
    occluded = [line for seq in sequences for line in (seq / "gt" / "gt.txt").read_text().splitlines()
                if line.endswith(",0")]
    assert occluded, "the export should hold frames where a present object is hidden (visibility 0)"


def test_llava_round_trip(tmp_path, world):
    done = export("llava", tmp_path / "llava", OPTIONS)
    samples = load_llava(done.path, done.image_root).samples
    entries = json.loads(done.path.read_text())
    assert len(samples) == OPTIONS.n
    builder = ConversationBuilder()
    for i, (sample, entry) in enumerate(zip(samples, entries)):
        task = entry["id"].rsplit("/", 1)[1]
        want = TaskSource(world, task, "val", builder)[i]  # what training from memory reads for (task, scene i)
        assert want.id == entry["id"] and sample.turns == want.turns
        assert np.array_equal(sample.load().image, want.image)
    assert len({e["id"].rsplit("/", 1)[1] for e in entries}) > 1


def test_cli_export_refuses_a_folder_in_use(tmp_path, capsys):
    out = tmp_path / "coco"
    args = ["data", "export", "--format", "coco", "--n", "2", "--image-size", "32", str(out)]
    assert main(args) == 0
    assert "instances_train.json" in capsys.readouterr().out
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    with pytest.raises(ConfigError, match="unknown format"):
        export("voc", tmp_path / "x")
