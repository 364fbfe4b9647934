"""Real-format loaders on small fixture files written here: LLaVA JSON, COCO + RefCOCO, MOT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from taskmllm.data.formats import load_coco, load_llava, load_mot, load_refcoco
from taskmllm.errors import DataFormatError


def _png(path, h, w, seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _hand_rle(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE written independently: column-major runs, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


MASK_RLE = np.zeros((30, 40), bool)
MASK_RLE[10:20, 25:35] = True
MASK_RLE[12:14, 27:30] = False  # a hole
MASK_CRLE = np.zeros((20, 20), bool)
for r in range(4, 16):
    MASK_CRLE[r, 3:3 + r] = True


def _coco(tmp_path, extra=()):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    _png(img_dir / "a.png", 30, 40)
    _png(img_dir / "b.png", 20, 20, 1)
    compressed = mask_utils.encode(np.asfortranarray(MASK_CRLE.astype(np.uint8)))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 10], "iscrowd": 0, "area": 150,
             "segmentation": [[5, 5, 20, 5, 20, 15, 5, 15]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [25, 10, 10, 10], "iscrowd": 1, "area": 94,
             "segmentation": {"size": [30, 40], "counts": _hand_rle(MASK_RLE)}},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [3, 4, 15, 12], "iscrowd": 0, "area": 1,
             "segmentation": {"size": [20, 20], "counts": compressed["counts"].decode("ascii")}},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1, 1, 17.5, 17.5], "iscrowd": 0, "area": 1,
             "segmentation": [[1, 1, 6, 1, 3.5, 5.5], [12, 12, 18.5, 12, 18.5, 18.5, 12, 18.5]]},
            *extra],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def test_coco_masks_match_pycocotools_and_hand_made_masks(tmp_path):
    path, img_dir = _coco(tmp_path)
    result = load_coco(path, img_dir)
    assert not result.errors and len(result) == 2
    oracle = COCO(str(path))
    objects = {o.id: o for s in result for o in s.objects}
    for ann_id, obj in objects.items():
        assert np.array_equal(obj.mask, oracle.annToMask(oracle.anns[ann_id]).astype(bool)), ann_id
    assert np.array_equal(objects[2].mask, MASK_RLE) and np.array_equal(objects[3].mask, MASK_CRLE)
    assert objects[1].mask[6:15, 6:20].all() and not objects[1].mask[16:, :].any()
    assert objects[1].category == "cat" and list(objects[1].box) == [5, 5, 20, 15]
    s = result[0].load()
    assert s.image.shape == (30, 40, 3) and s.hw == (30, 40)


def test_coco_malformed_entries_are_named_and_valid_ones_kept(tmp_path):
    bad = [{"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 3, 1, 3, 3]]},  # no bbox
           {"id": 11, "image_id": 2, "category_id": 1, "bbox": [10, 10, 15, 5],
            "segmentation": [[10, 10, 19, 10, 19, 14]]},  # box beyond the 20x20 image
           {"id": 12, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}]
    path, img_dir = _coco(tmp_path, bad)
    with pytest.raises(DataFormatError) as info:
        load_coco(path, img_dir)
    err = info.value
    assert isinstance(err, ValueError) and "annotations[4] (id=10)" in str(err) and "bbox" in str(err)
    assert [e.entry for e in err.errors] == ["annotations[4] (id=10)", "annotations[5] (id=11)",
                                             "annotations[6] (id=12)"]
    assert "outside" in err.errors[1].reason and "unknown image id 99" in err.errors[2].reason
    assert sum(len(s.objects) for s in err.partial.samples) == 4
    lenient = load_coco(path, img_dir, strict=False)
    assert len(lenient.errors) == 3 and sorted(o.id for s in lenient for o in s.objects) == [1, 2, 3, 4]
    (tmp_path / "broken.json").write_text('{"images": []}')
    with pytest.raises(DataFormatError, match="missing key"):
        load_coco(tmp_path / "broken.json", strict=False)


def test_refcoco(tmp_path):
    path, img_dir = _coco(tmp_path)
    refs = [{"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "train", "category_id": 1,
             "sentences": [{"sent": "the left cat", "sent_id": 0}, {"sent": "small  cat", "sent_id": 1}]},
            {"ref_id": 1, "ann_id": 3, "image_id": 2, "split": "val", "sentences": [{"sent": "a cat"}]},
            {"ref_id": 2, "ann_id": 999, "image_id": 2, "split": "val", "sentences": [{"sent": "ghost"}]}]
    refs_path = tmp_path / "refs.json"
    refs_path.write_text(json.dumps(refs))
    res = load_refcoco(path, refs_path, img_dir, strict=False)
    assert len(res) == 3 and len(res.errors) == 1 and "refs[2] (ref_id=2)" in res.errors[0].entry
    oracle = COCO(str(path))
    s = res[1]
    assert s.turns == [("Please segment small cat.\n<image>", "Sure, <ref>small cat</ref><seg>.")]
    assert s.targets[0].task == "seg" and np.array_equal(s.targets[0].mask, oracle.annToMask(oracle.anns[1]) > 0)
    assert np.allclose(s.targets[0].boxes, [[5 / 40, 5 / 30, 20 / 40, 15 / 30]])
    det = load_refcoco(path, refs_path, img_dir, split="val", task="det", strict=False)
    assert [x.turns[0][1] for x in det] == ["<ref>a cat</ref><det>."] and det[0].targets[0].mask is None
    with pytest.raises(DataFormatError, match="ref_id=2"):
        load_refcoco(path, refs_path, img_dir)


def test_llava_json(tmp_path):
    arr = _png(tmp_path / "x.png", 8, 10)
    good = {"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    entries = [good,
               {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
               {"id": "noph", "image": "x.png", "conversations": [{"from": "human", "value": "Color?"},
                                                                  {"from": "gpt", "value": "Grey."}]},
               {"id": "nokey", "image": "x.png"},
               {"id": "role", "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
               {"id": "task", "image": "x.png", "conversations": [{"from": "human", "value": "<image> seg it"},
                                                                  {"from": "gpt", "value": "<ref>it</ref><seg>"}]},
               {"id": "missing", "image": "nope.png", "conversations": good["conversations"]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    res = load_llava(path, tmp_path, strict=False)
    assert [s.id for s in res] == ["llava/a", "llava/text", "llava/noph"]
    assert [e.entry.split()[0] for e in res.errors] == ["[3]", "[4]", "[5]", "[6]"]
    assert "conversations" in res.errors[0].reason and "not found" in res.errors[3].reason
    assert res[0].turns[1] == ("Sure?", "Yes.") and np.array_equal(res[0].load().image, arr)
    assert res[2].turns[0][0] == "Color?\n<image>" and res[1].image_path is None
    with pytest.raises(DataFormatError, match=r"\[3\] \(id=nokey\)"):
        load_llava(path, tmp_path)


def _mot(tmp_path, lines):
    seq = tmp_path / "SEQ-01"
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    for t in range(1, 6):
        _png(seq / "img1" / f"{t:06d}.png", 24, 32, t)
    (seq / "seqinfo.ini").write_text("[Sequence]\nname=SEQ-01\nimDir=img1\nframeRate=10\nseqLength=5\n"
                                     "imWidth=32\nimHeight=24\nimExt=.png\n")
    (seq / "gt" / "gt.txt").write_text("\n".join(lines) + "\n")
    return seq


def test_mot_tracks(tmp_path):
    lines = [f"{t},1,{2 + t},3,6,8,1,1,{0.0 if t == 3 else 0.9}" for t in range(1, 6)]
    lines += ["2,2,10,10,5,5,1,1,1.0", "3,2,12,10,5,5,1,1,0.5", "4,2,-3,10,6,5,1,1,0.4"]
    lines += ["1,3,0,0,4,4,0,1,1.0", "2,4,0,0,4,4,1,7,1.0"]  # conf 0 (ignored) and a static person (filtered)
    lines += ["3,5,1", "9,6,0,0,2,2,1,1,1", "5,7,40,30,3,3,1,1,1"]  # malformed lines 11, 12, 13
    seq = _mot(tmp_path, lines)
    res = load_mot(seq, strict=False)
    assert [e.entry for e in res.errors] == ["line 11", "line 12", "line 13"]
    (s,) = res.samples
    objs = {o.id: o for o in s.objects}
    assert sorted(objs) == [1, 2]
    assert objs[1].visible.tolist() == [True, True, False, True, True] and objs[1].interval == (0, 4)
    assert objs[1].boxes[0].tolist() == [3, 3, 9, 11]
    assert objs[2].visible.tolist() == [False, True, True, True, False] and objs[2].interval == (1, 3)
    assert objs[2].boxes[3].tolist() == [0, 10, 3, 15]  # clipped to the image
    frames = s.load().frames
    assert frames.shape == (5, 24, 32, 3)
    with pytest.raises(DataFormatError, match="line 11"):
        load_mot(seq)
    clips = load_mot(seq, strict=False, clip_len=2)
    assert [c.num_frames for c in clips] == [2, 2, 1] and clips[1].objects[0].visible.tolist() == [False, True]
