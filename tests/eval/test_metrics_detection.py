"""COCO AP through pycocotools: known answers and agreement with pycocotools called directly on JSON files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from taskmllm.errors import MetricInputError
from taskmllm.eval.detection import DetectionGroundTruth, DetectionPrediction, coco_ap

H, W = 120, 160


def _fixture() -> list[DetectionGroundTruth]:
    return [
        DetectionGroundTruth(boxes=[[10, 10, 50, 40], [60, 20, 120, 90]], labels=[1, 2], height=H, width=W),
        DetectionGroundTruth(boxes=[[5, 5, 25, 30], [30, 40, 100, 110], [110, 10, 150, 50]], labels=[1, 1, 3],
                             height=H, width=W),
        DetectionGroundTruth(boxes=[[40, 40, 80, 70]], labels=[2], height=H, width=W),
    ]


def _shifted(gts: list[DetectionGroundTruth]) -> list[DetectionPrediction]:
    """Predictions = ground truth shifted by growing offsets, with descending scores and false positives."""
    rng = np.random.default_rng(0)
    preds = []
    for i, gt in enumerate(gts):
        boxes = np.asarray(gt.boxes, float) + np.array([3, 2, 3, 2]) * (i + 1)
        boxes = np.vstack([boxes, [[0, 0, 20, 20]]])  # one false positive per image
        scores = rng.uniform(0.2, 1.0, len(boxes))
        labels = np.append(np.asarray(gt.labels), 1)
        preds.append(DetectionPrediction(boxes=boxes, scores=scores, labels=labels))
    return preds


def test_perfect_predictions_give_ap_one() -> None:
    gts = _fixture()
    preds = [DetectionPrediction(boxes=g.boxes, scores=np.ones(len(g.labels)), labels=g.labels) for g in gts]
    out = coco_ap(gts, preds)
    assert out["AP"] == pytest.approx(1.0)
    assert out["AP50"] == pytest.approx(1.0)
    assert out["AP75"] == pytest.approx(1.0)
    assert out["n_images"] == 3 and out["n_gt"] == 6
    assert len(out["pr_curve"]["recall"]) == 101
    assert out["pr_curve"]["precision"][-1] == pytest.approx(1.0)


def test_single_box_with_known_iou() -> None:
    # one ground truth [0,0,100,100], one prediction [0,0,100,72]: IoU = 7200 / 10000 = 0.72.
    # COCO matches at IoU >= t for t in .50,.55,...,.95 -> matched for .50,.55,.60,.65,.70 (5 of 10),
    # each matched threshold has AP 1 and each unmatched AP 0 -> AP = 5/10; AP50 = 1; AP75 = 0.
    gt = [DetectionGroundTruth(boxes=[[0, 0, 100, 100]], labels=[7], height=200, width=200)]
    pred = [DetectionPrediction(boxes=[[0, 0, 100, 72]], scores=[0.9], labels=[7])]
    out = coco_ap(gt, pred)
    assert out["AP"] == pytest.approx(0.5)
    assert out["AP50"] == pytest.approx(1.0)
    assert out["AP75"] == pytest.approx(0.0)
    # the same box of the wrong class finds nothing; class-agnostic evaluation ignores the label
    wrong = [DetectionPrediction(boxes=[[0, 0, 100, 72]], scores=[0.9], labels=[8])]
    assert coco_ap(gt, wrong)["AP"] == pytest.approx(0.0)
    assert coco_ap(gt, wrong, class_agnostic=True)["AP"] == pytest.approx(0.5)


def test_shifted_boxes_equal_pycocotools_on_json_files(tmp_path: Path) -> None:
    gts = _fixture()
    preds = _shifted(gts)
    # Independent path: write COCO JSON files by hand and evaluate them with pycocotools directly.
    images, anns, results = [], [], []
    for i, (gt, pred) in enumerate(zip(gts, preds)):
        images.append({"id": i + 1, "height": gt.height, "width": gt.width, "file_name": f"{i}.png"})
        for (x1, y1, x2, y2), label in zip(np.asarray(gt.boxes, float), gt.labels):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for (x1, y1, x2, y2), score, label in zip(pred.boxes, pred.scores, pred.labels):
            results.append({"image_id": i + 1, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": anns,
                                   "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    dt_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(str(dt_file))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected_ap, expected_ap50, expected_ap75 = ev.stats[:3]
    out = coco_ap(gts, preds)
    assert 0.0 < out["AP"] < 1.0  # the fixture is not trivial
    assert out["AP"] == expected_ap
    assert out["AP50"] == expected_ap50
    assert out["AP75"] == expected_ap75


def test_segm_ap_through_rle(tmp_path: Path) -> None:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 10:40, 10:50] = True
    masks[1, 50:100, 60:140] = True
    gt = [DetectionGroundTruth(boxes=[], labels=[1, 2], height=H, width=W, masks=masks)]
    perfect = [DetectionPrediction(boxes=[], scores=[0.9, 0.8], labels=[1, 2], masks=masks)]
    assert coco_ap(gt, perfect, iou_type="segm")["AP"] == pytest.approx(1.0)

    shifted = np.roll(masks, 6, axis=2)
    pred = [DetectionPrediction(boxes=[], scores=[0.9, 0.8], labels=[1, 2], masks=shifted)]
    out = coco_ap(gt, pred, iou_type="segm")

    def rle(m: np.ndarray) -> dict:
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        return r

    gt_json = {"images": [{"id": 1, "height": H, "width": W}],
               "annotations": [{"id": k + 1, "image_id": 1, "category_id": k + 1, "segmentation": rle(m),
                                "area": float(m.sum()), "iscrowd": 0} for k, m in enumerate(masks)],
               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    dt_json = [{"image_id": 1, "category_id": k + 1, "segmentation": rle(m), "score": s}
               for k, (m, s) in enumerate(zip(shifted, [0.9, 0.8]))]
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "dt.json").write_text(json.dumps(dt_json))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0.0 < out["AP"] < 1.0
    assert [out["AP"], out["AP50"], out["AP75"]] == list(ev.stats[:3])


def test_no_predictions_and_silence(capsys: pytest.CaptureFixture[str]) -> None:
    gts = _fixture()
    empty = [DetectionPrediction(boxes=np.zeros((0, 4)), scores=[], labels=[]) for _ in gts]
    out = coco_ap(gts, empty)
    assert out["AP"] == 0.0 and out["AP50"] == 0.0
    coco_ap(gts, _shifted(gts))
    assert capsys.readouterr().out == ""  # COCOeval's printing is silenced


def test_bad_input() -> None:
    gts = _fixture()
    with pytest.raises(MetricInputError):
        coco_ap(gts, _shifted(gts)[:2])
    with pytest.raises(MetricInputError, match="undefined"):
        coco_ap([DetectionGroundTruth(boxes=np.zeros((0, 4)), labels=[], height=H, width=W)],
                [DetectionPrediction(boxes=[[0, 0, 1, 1]], scores=[1.0], labels=[1])])
    with pytest.raises(MetricInputError, match="scores"):
        coco_ap(gts[:1], [DetectionPrediction(boxes=[[0, 0, 1, 1]], scores=[1.0, 0.5], labels=[1])])
    with pytest.raises(MetricInputError, match="masks"):
        coco_ap(gts[:1], _shifted(gts)[:1], iou_type="segm")
    with pytest.raises(MetricInputError, match="iou_type"):
        coco_ap(gts, _shifted(gts), iou_type="keypoints")  # type: ignore[arg-type]


def test_segm_image_without_predictions_needs_no_masks() -> None:
    masks = np.zeros((1, H, W), dtype=bool)
    masks[0, 10:40, 10:50] = True
    gts = [DetectionGroundTruth(boxes=[], labels=[1], height=H, width=W, masks=masks),
           DetectionGroundTruth(boxes=[], labels=[1], height=H, width=W, masks=masks)]
    preds = [DetectionPrediction(boxes=[], scores=[1.0], labels=[1], masks=masks),
             DetectionPrediction(boxes=[], scores=[], labels=[])]
    out = coco_ap(gts, preds, iou_type="segm")
    # one of two objects found with precision 1: AP = 101-point mean of precision over recall thresholds
    # 0..0.5 (51 of 101 points, precision 1) -> 51/101 at every IoU threshold
    assert out["AP"] == pytest.approx(51 / 101)
