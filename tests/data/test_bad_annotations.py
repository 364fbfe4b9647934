"""Each kind of broken annotation file gets a DataFormatError naming the file and the entry, with the reason.

Cases (the issue's list): a missing image, an empty or self-intersecting polygon, an RLE of the wrong size, an
unknown category id, a box outside the image, a track with a gap in its frame numbers. Also through a training
source (``kind: coco`` / ``mot``): strict by default, ``strict: false`` skips the entry.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from taskmllm.data.coco import check_polygons, load_coco, rle_string_counts
from taskmllm.data.mot import load_mot
from taskmllm.data.sources import parse_sources
from taskmllm.errors import DataFormatError

SQUARE = [[2, 2, 10, 2, 10, 10, 2, 10]]


def _coco(tmp_path, ann: dict, *, image: bool = True, width: int = 20, height: int = 16):
    (tmp_path / "img").mkdir(exist_ok=True)
    if image:
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    base = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "segmentation": SQUARE}
    data = {"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
            "categories": [{"id": 1, "name": "cat"}], "annotations": [{**base, **ann}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _error(tmp_path, ann: dict, **kwargs) -> DataFormatError:
    path = _coco(tmp_path, ann, **kwargs)
    with pytest.raises(DataFormatError) as info:
        load_coco(path, tmp_path / "img")
    err = info.value
    assert err.source == str(path) and str(path) in str(err)
    return err


def test_valid_file_loads(tmp_path):
    (scene,) = load_coco(_coco(tmp_path, {}), tmp_path / "img").samples
    assert scene.objects[0].mask[2:10, 2:10].all() and scene.objects[0].mask.sum() == 64


def test_missing_image(tmp_path):
    err = _error(tmp_path, {}, image=False)
    assert err.entry == "images[0] (id=1)" and "image file not found" in err.reason and "a.png" in err.reason


@pytest.mark.parametrize("polygon, reason", [
    ([], "empty polygon list"),
    ([[1, 1, 5, 5]], "polygon 0 is empty: it needs a flat list of >= 3 (x, y) pairs"),
    ([[1, 1, 3, 3, 6, 6, 9, 9]], "polygon 0 is empty: its points enclose no area"),  # collinear
])
def test_empty_polygon(tmp_path, polygon, reason):
    err = _error(tmp_path, {"segmentation": polygon})
    assert err.entry == "annotations[0] (id=7)" and reason in err.reason


def test_self_intersecting_polygon(tmp_path):
    bowtie = [[2, 2, 10, 10, 10, 2, 2, 10]]  # its edges cross at (6, 6)
    err = _error(tmp_path, {"segmentation": [SQUARE[0], bowtie[0]]})
    assert err.entry == "annotations[0] (id=7)" and "polygon 1 intersects itself" in err.reason
    check_polygons(SQUARE)  # a simple one passes


def test_rle_of_the_wrong_size(tmp_path):
    mask = np.zeros((16, 20), np.uint8)
    mask[2:10, 2:10] = 1
    small = mask_utils.encode(np.asfortranarray(mask[:12]))
    err = _error(tmp_path, {"segmentation": {"size": [12, 20], "counts": small["counts"].decode()}})
    assert err.entry == "annotations[0] (id=7)" and "RLE size [12, 20] differs from the image size [16, 20]" in err.reason
    wrong = {"size": [16, 20], "counts": small["counts"].decode()}  # right size field, runs of a 12 x 20 mask
    err = _error(tmp_path, {"segmentation": wrong})
    assert "compressed RLE runs cover 240 pixels, its 16x20 image has 320" in err.reason
    err = _error(tmp_path, {"segmentation": {"size": [16, 20], "counts": [10, 5]}})
    assert "uncompressed RLE counts do not sum to height * width" in err.reason


def test_rle_string_counts_is_pycocotools_format():
    mask = np.random.default_rng(0).random((9, 7)) < 0.4
    runs, flat, current = [], mask.flatten(order="F"), False
    for start in range(len(flat) + 1):  # hand-made uncompressed runs (zeros first)
        if start == len(flat) or flat[start] != current:
            runs.append(start - sum(runs))
            current = not current
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    assert rle_string_counts(compressed) == runs and sum(runs) == 63


def test_unknown_category_id(tmp_path):
    err = _error(tmp_path, {"category_id": 99})
    assert err.entry == "annotations[0] (id=7)" and "unknown category id 99" in err.reason


def test_box_outside_the_image(tmp_path):
    err = _error(tmp_path, {"bbox": [15, 2, 8, 8]})  # x2 = 23 > width 20
    assert err.entry == "annotations[0] (id=7)" and "bbox [15, 2, 8, 8] lies outside its 20x16 image" in err.reason


def _sequence(tmp_path, lines: list[str], frames: int = 5):
    seq = tmp_path / "SEQ"
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    for t in range(1, frames + 1):
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(seq / "img1" / f"{t:06d}.png")
    (seq / "seqinfo.ini").write_text(f"[Sequence]\nname=SEQ\nimDir=img1\nseqLength={frames}\nimWidth=32\n"
                                     "imHeight=24\nimExt=.png\n")
    (seq / "gt" / "gt.txt").write_text("\n".join(lines) + "\n")
    return seq


def test_track_with_a_gap_in_frame_numbers(tmp_path):
    lines = ["1,1,2,2,5,5,1,1,1", "2,1,3,2,5,5,1,1,1", "5,1,6,2,5,5,1,1,1",  # frames 3 and 4 missing
             "1,2,10,10,5,5,1,1,1", "2,2,11,10,5,5,1,1,0"]
    seq = _sequence(tmp_path, lines)
    with pytest.raises(DataFormatError) as info:
        load_mot(seq)
    err = info.value
    assert err.source.endswith("gt.txt") and err.entry == "line 3 (track 1)"
    assert "track 1 has a gap in frame numbers: it jumps from frame 2 to frame 5" in err.reason
    (clip,) = load_mot(seq, strict=False).samples  # the broken track is dropped, the other kept
    assert [o.id for o in clip.objects] == [2]


def test_mot_box_outside_the_image_and_missing_frame(tmp_path):
    seq = _sequence(tmp_path, ["1,1,40,2,5,5,1,1,1"])
    with pytest.raises(DataFormatError, match=r"line 1: box \(40.0, 2.0, 5.0, 5.0\) lies outside the 32x24 image"):
        load_mot(seq)
    (seq / "img1" / "000003.png").unlink()
    with pytest.raises(DataFormatError, match="frame 3: frame file not found: .*000003.png"):
        load_mot(seq, strict=False)


def test_a_training_source_names_the_file_and_entry_or_skips_it(tmp_path, caplog):
    path = _coco(tmp_path, {"category_id": 99})
    options = {"kind": "coco", "path": str(path), "image_root": str(tmp_path / "img")}
    spec = parse_sources({"coco": options})["coco"]
    with pytest.raises(DataFormatError, match=r"instances.json: annotations\[0\] \(id=7\): unknown category id 99"):
        spec.build(10, 0)
    lenient = parse_sources({"coco": {**options, "strict": False, "mix": {"exist": 1.0}}})["coco"]
    with caplog.at_level(logging.WARNING):
        sample = lenient.build(10, 0)[0]
    assert sample.objects == [] and "unknown category id 99" in caplog.text  # the image kept, the entry skipped
