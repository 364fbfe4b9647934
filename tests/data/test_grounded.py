"""Conversations for real annotations: the token protocol, the targets, the grounding, the max-instances rule,
templates as data, the refcoco / coco / mot source kinds and how a stage mixes its sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.data.grounded import GroundedBuilder, GroundedOptions, keep_largest
from taskmllm.data.sample import ObjectGT, Sample
from taskmllm.data.shapesworld.export import ExportOptions, export
from taskmllm.data.sources import build_dataset, check_model_fit, parse_sources
from taskmllm.data.templates import load_templates
from taskmllm.errors import ConfigError
from taskmllm.experts import build_expert, default_spec
from taskmllm.model.tokens import decode_boxes

H, W = 40, 80


def _obj(i, cat, x1, y1, x2, y2, **labels):
    mask = np.zeros((H, W), bool)
    mask[y1:y2, x1:x2] = True
    return ObjectGT(id=i, category=cat, mask=mask, box=np.array([x1, y1, x2, y2], float), labels=labels)


def _scene(objects, **meta):
    return Sample(id="s", source="coco", objects=objects, image_path="x.png",
                  meta={"height": H, "width": W, "categories": ["cat", "dog", "person"], **meta})


@pytest.fixture(scope="module")
def templates():
    return load_templates()


def test_ref_questions_targets_and_grounding(templates):
    scene = _scene([_obj(3, "cat", 8, 4, 24, 20), _obj(5, "dog", 40, 10, 60, 30)], ann_id=5,
                   sentences=["the dog on the right", "brown dog"])
    builder = GroundedBuilder(templates, GroundedOptions(boxes_in_answer=True))
    seg = builder.refer(scene, "seg", "brown dog")
    assert seg.turns == [("Please segment brown dog.", "Sure, <ref>brown dog</ref><seg>.")]  # no <image>: the model
    (target,) = seg.targets                                                                  # places it
    assert target.task == "seg" and np.array_equal(target.mask, scene.objects[1].mask)
    assert np.allclose(target.boxes, [[40 / 80, 10 / 40, 60 / 80, 30 / 40]])
    assert seg.grounding.objects == (5,) and seg.grounding.text == "Please segment brown dog."
    rec = builder.refer(scene, "rec", "the dog on the right")
    assert rec.turns[0][1].startswith("<ref>the dog on the right</ref><det> <box>")  # UnifiedMLLM-style box text
    assert np.allclose(decode_boxes(rec.turns[0][1]), target.boxes, atol=1e-3)
    assert rec.targets[0].task == "det" and rec.targets[0].mask is None
    drawn = {builder.build(scene, "seg", np.random.default_rng(k)).turns[0][0] for k in range(40)}
    assert len(drawn) > 3  # paraphrases and both sentences are drawn


def test_det_keeps_the_largest_instances_and_the_expert_takes_them(templates):
    """12 cats, 8 detection queries: the answer keeps the 8 largest (sorted left to right), the grounding names
    all 12, and the real detection expert's loss runs on the target (it raises on more boxes than queries)."""
    cats = [_obj(i, "cat", 6 * i, 2, 6 * i + 2 + i % 4, 10 + i) for i in range(12)]
    scene = _scene(cats + [_obj(20, "dog", 0, 30, 5, 35)])
    builder = GroundedBuilder(templates, GroundedOptions(max_instances=8))
    sample = builder.detect(scene, builder.phrase("cat"))
    area = {o.id: o.mask.sum() for o in cats}
    largest = sorted(sorted(area, key=lambda i: (-area[i], i))[:8], key=lambda i: scene.objects[i].box[0])
    boxes = sample.targets[0].boxes
    assert boxes.shape == (8, 4) and np.allclose(boxes * [W, H, W, H], [scene.objects[i].box for i in largest])
    assert sample.grounding.objects == tuple(range(12))
    assert sample.turns == [("Find all cats.", "<ref>cats</ref><det>.")]
    assert [o.id for o in keep_largest(cats, 8)] == sorted(largest)
    expert = build_expert("det", default_spec("det", 32, 16, (4, 4), 64, num_queries=8))
    from taskmllm.experts.base import VisionFeatures

    out = expert(torch.randn(1, 8, 32), VisionFeatures(torch.randn(1, 1, 16, 16), (4, 4), 64))
    assert torch.isfinite(sum(expert.loss(out, sample.targets).values()))
    person = builder.detect(scene, builder.phrase("person"))  # an absent category: no box
    assert person.targets[0].boxes.shape == (0, 4) and person.turns[0][1] == "<ref>people</ref><det>."


def test_exist_count_and_qualified_phrases(templates):
    scene = _scene([_obj(1, "cat", 0, 0, 5, 5, color="red"), _obj(2, "cat", 10, 0, 15, 5, color="blue"),
                    _obj(3, "cat", 20, 0, 25, 5, color="red")])
    builder = GroundedBuilder(templates, GroundedOptions(attributes=("color",), qualified=1.0, absent=0.0))
    answers = {}
    for k in range(60):
        s = builder.build(scene, "count", np.random.default_rng(k))
        answers[s.turns[0][0]] = (s.turns[0][1], s.grounding.objects)
    assert answers["How many red cats are there?"] == ("Two.", (1, 3))
    assert answers["How many blue cats are there?"] == ("One.", (2,))
    exist = [builder.build(scene, "exist", np.random.default_rng(k)) for k in range(40)]
    said = {(s.turns[0][0], s.turns[0][1]) for s in exist}
    assert ("Is there a dog in the image?", "No.") in said and ("Is there a red cat in the image?", "Yes.") in said
    assert all(s.grounding.objects == () for s in exist if s.turns[0][1] == "No.")


def test_video_tasks(templates):
    boxes = np.array([[4, 4, 12, 12], [6, 4, 14, 12], [0, 0, 0, 0], [10, 4, 18, 12]], float)
    visible = np.array([True, True, False, True])
    a = ObjectGT(2, "car", boxes=boxes, visible=visible, interval=(0, 3), present=np.ones(4, bool))
    b = ObjectGT(3, "person", boxes=boxes[[2, 1, 1, 3]], visible=np.array([False, True, True, True]),
                 interval=(1, 3), present=np.ones(4, bool))
    c = ObjectGT(4, "person", boxes=boxes, visible=visible, interval=(0, 3), present=np.ones(4, bool))
    clip = Sample(id="m", source="mot", objects=[a, b, c], frame_paths=["f"] * 4, meta={"height": 20, "width": 40})
    builder = GroundedBuilder(templates)
    track = builder.build(clip, "track")  # only the car has a unique category; no rng: the first template
    assert track.turns == [("Track the car.", "<ref>the car</ref><track>.")]
    assert np.allclose(track.targets[0].boxes, boxes / [40, 20, 40, 20]) and track.targets[0].visible.tolist() == \
        visible.tolist()
    box = builder.track_from_box(clip, c)
    assert box.turns[0][0] == "Track the object in <box>100,200,300,599</box> of the first frame."  # x 999
    assert np.allclose(box.targets[0].prompt_box, [0.1, 0.2, 0.3, 0.6]) and box.grounding.objects == (4,)
    temporal = builder.build(clip, "temporal_box", np.random.default_rng(3))
    obj = {o.id: o for o in clip.objects}[temporal.grounding.objects[0]]
    assert temporal.turns[0][1] == f"From frame {obj.interval[0]} to frame {obj.interval[1]}."
    assert f"in frame {obj.interval[0]}" in temporal.turns[0][0] or f"of frame {obj.interval[0]}" in temporal.turns[0][0]
    clip.objects = [b, c]  # two people: no category names one track
    assert not builder.supports(clip, "track") and not builder.supports(clip, "temporal")


def test_templates_are_data(tmp_path, templates):
    mine = tmp_path / "mine.yaml"
    mine.write_text("det:\n  questions: ['Show me every {category}.']\nplurals: {cat: kitties}\n")
    custom = load_templates(mine)
    assert custom.det.questions == ["Show me every {category}."] and custom.det.answers == templates.det.answers
    assert custom.plural("cat") == "kitties" and custom.plural("person") == "people"  # plurals merged
    assert custom.seg == templates.seg  # tasks it does not name stay
    builder = GroundedBuilder(custom)
    sample = builder.detect(_scene([_obj(1, "cat", 0, 0, 4, 4)]), builder.phrase("cat"))
    assert sample.turns == [("Show me every cat.", "<ref>kitties</ref><det>.")]
    for bad, message in (("seg:\n  answers: ['Sure.']\n", r"seg.answers\[0\] 'Sure.' must hold \{grounded\}"),
                         ("rec:\n  questions: ['Where is {thing}?']\n", r"rec.questions\[0\] .* must use one of"),
                         ("count:\n  answers: ['Many.']\n", r"must hold \{count\} or \{count_word\}"),
                         ("segg: {}\n", r"unknown key .*segg.* \(did you mean 'seg'\?\)")):
        mine.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_templates(mine)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    options = ExportOptions(n=8, image_size=48, num_frames=4)
    return {fmt: export(fmt, root / fmt, options) for fmt in ("refcoco", "coco", "mot", "llava")}


def _sources(exported, **extra):
    e = exported
    raw = {"refs": {"kind": "refcoco", "path": str(e["refcoco"].path),
                    "instances": str(e["refcoco"].path.parent / "instances.json"),
                    "image_root": str(e["refcoco"].image_root), "weight": 2.0},
           "coco": {"kind": "coco", "path": str(e["coco"].path), "image_root": str(e["coco"].image_root),
                    "mix": {"det": 1.0, "count": 1.0}, "attributes": ["color"]},
           "mot": {"kind": "mot", "path": str(e["mot"].path), "clip_len": 4, "weight": 0.5},
           "chat": {"kind": "llava", "path": str(e["llava"].path), "image_root": str(e["llava"].image_root),
                    "weight": 0.5}}
    for name, options in extra.items():
        raw[name] = {**raw[name], **options}
    return parse_sources(raw)


def test_sources_mix_by_weight(exported):
    specs = _sources(exported)
    for spec in specs.values():
        spec.check_files()
    data = build_dataset(specs, 4000, seed=0)
    drawn = [data.locate(i)[0] for i in range(4000)]
    for name, share in {"refs": 0.5, "coco": 0.25, "mot": 0.125, "chat": 0.125}.items():
        got = drawn.count(name) / 4000
        assert abs(got - share) < 4 * np.sqrt(share * (1 - share) / 4000), (name, got)  # binomial, 4 sigma
    kinds = {data[i].source: data[i] for i in range(40)}
    assert set(kinds) == {"refcoco", "coco", "mot", "llava"}
    assert kinds["mot"].frames.shape == (4, 48, 48, 3) and kinds["refcoco"].image.shape == (48, 48, 3)
    again = build_dataset(_sources(exported), 4000, seed=0)
    assert [again[i].turns for i in range(20)] == [data[i].turns for i in range(20)]  # deterministic
    labels = specs["coco"].label_classes()
    assert set(labels) == {"category", "color", "size"} and "circle" in labels["category"]


def test_sources_are_checked_against_the_model(exported):
    tasks = {"seg": 1, "det": 8, "track": 1}
    with pytest.raises(ConfigError, match=r"data.sources.coco.max_instances: 12 boxes per answer, but the model's "
                                          r"<det> expert predicts at most 8"):
        check_model_fit(_sources(exported, coco={"max_instances": 12}), tasks, max_frames=8)
    with pytest.raises(ConfigError, match=r"data.sources.mot.clip_len: 4 frames, but the model reads at most 2"):
        check_model_fit(_sources(exported), tasks, max_frames=2)
    with pytest.raises(ConfigError, match=r"data.sources.refs.mix.seg: its answers call <seg> but the model has "
                                          r"no 'seg' expert"):
        check_model_fit(_sources(exported), {"det": 8, "track": 1}, max_frames=8)
    check_model_fit(_sources(exported), tasks, max_frames=4)
    with pytest.raises(ConfigError, match=r"mix: 'sge' \(did you mean 'seg'\?\) is not a task of kind 'refcoco'"):
        _sources(exported, refs={"mix": {"sge": 1.0}})


def test_a_task_no_scene_supports_fails_when_the_stage_starts(exported):
    spec = _sources(exported, mot={"mix": {"track": 1.0}})["mot"]
    for clip in spec.scenes():
        clip.objects = clip.objects + clip.objects  # every category twice: no category phrase names one track
    with pytest.raises(ConfigError, match=r"none of its 8 scenes supports task 'track' \(it needs an object whose "
                                          r"category is unique in its clip\)"):
        spec.build(10, 0)
