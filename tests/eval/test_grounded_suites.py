"""Suites on real-format files (refcoco, coco, mot) with answer functions whose answers are known: an oracle built
from the files, and stubs whose scores are computed by hand or by pycocotools reading the exported file itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from taskmllm.data.coco import load_coco
from taskmllm.data.shapesworld.export import ExportOptions, export
from taskmllm.eval.benchmarks import EvalOptions, report_suite, run_suite
from taskmllm.eval.grounded_suites import coco_items, mot_items, refcoco_items
from taskmllm.errors import ConfigError
from taskmllm.model.tokens import strip_protocol


@dataclass
class Call:
    task: str
    mask: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None


@dataclass
class Answer:
    text: str
    calls: list = field(default_factory=list)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    options = ExportOptions(n=5, split="val", seed=1, image_size=48, num_frames=4)
    return {fmt: export(fmt, root / fmt, options) for fmt in ("refcoco", "coco", "mot")}


def _oracle(items, shift: int = 0):
    """Answers every question with its ground truth (masks shifted right by ``shift`` pixels)."""
    by_question = {(str(it.visual), it.prompt): it for it in items}

    def answer(batch):
        out = []
        for visual, prompt in batch:
            it = by_question[(str(visual), prompt)]
            t = it.sample.targets[0] if it.sample.targets else None
            h, w = it.sample.hw
            if t is None:
                out.append(Answer(strip_protocol(it.reference)))
            elif t.task == "seg":
                out.append(Answer("Sure.", [Call("seg", mask=np.roll(t.mask, shift, axis=1))]))
            else:
                boxes = np.asarray(t.boxes, np.float64).reshape(-1, 4) * [w, h, w, h]
                out.append(Answer("", [Call(t.task, boxes=boxes, scores=np.ones(len(boxes)))]))
        return out

    return answer


def _refcoco_options(files, **kw):
    e = files["refcoco"]
    return EvalOptions(data=e.path, instances=e.path.parent / "instances.json", images=e.image_root, progress=False,
                       **kw)


def test_refcoco_oracle_and_hand_computed_ious(files):
    e = files["refcoco"]
    items = refcoco_items(e.path, e.path.parent / "instances.json", e.image_root)
    assert len(items["seg"]) == len(items["rec"]) > 10
    perfect = run_suite("refcoco", _oracle(items["seg"] + items["rec"]), _refcoco_options(files)).results
    assert perfect["summary"]["seg"]["score"] == 1.0 and perfect["tasks"]["seg"]["giou"] == 1.0
    assert perfect["tasks"]["rec"]["acc@0.5"] == 1.0 and perfect["summary"]["rec"]["routing"] == 1.0
    shifted = run_suite("refcoco", _oracle(items["seg"] + items["rec"], shift=2), _refcoco_options(files, n=6))
    inter = union = 0
    ious = []
    for it in items["seg"][:6]:  # by hand: LISA's cIoU (summed) and gIoU (mean per sample)
        m = np.asarray(it.sample.targets[0].mask, bool)
        p = np.roll(m, 2, axis=1)
        inter, union = inter + (m & p).sum(), union + (m | p).sum()
        ious.append((m & p).sum() / (m | p).sum())
    seg = shifted.results["tasks"]["seg"]
    assert seg["n"] == 6 and seg["ciou"] == pytest.approx(inter / union) and seg["giou"] == pytest.approx(np.mean(ious))
    assert seg["ciou"] < 1.0


def test_refcoco_split_and_missing_options(files):
    e = files["refcoco"]
    with pytest.raises(Exception, match="no ref of split 'train'"):
        refcoco_items(e.path, e.path.parent / "instances.json", e.image_root, split="train")
    with pytest.raises(ConfigError, match="needs the COCO instances file"):
        run_suite("refcoco", _oracle([]), EvalOptions(data=e.path))
    with pytest.raises(ConfigError, match=r"needs its annotation files: --data"):
        run_suite("coco", _oracle([]), EvalOptions())


def test_coco_box_ap_equals_pycocotools_on_the_file(files):
    """A stub answering each (image, category) question with the true boxes at score 0.5 plus, for every category,
    one made-up box at score 0.9 (a false positive ranked first): the suite's AP equals COCOeval run directly on
    the exported instances file."""
    e = files["coco"]
    scenes, categories, items = coco_items(e.path, e.image_root)
    assert len(items) == len(scenes) * len(categories)
    truth = _oracle(items)

    def stub(batch):
        out = []
        for answer, (visual, prompt) in zip(truth(batch), batch):
            boxes = np.concatenate([answer.calls[0].boxes, [[1.0, 2.0, 20.0, 30.0]]])
            out.append(Answer("", [Call("det", boxes=boxes, scores=np.r_[np.full(len(boxes) - 1, 0.5), 0.9])]))
        return out

    options = EvalOptions(data=e.path, images=e.image_root, progress=False)
    assert run_suite("coco", truth, options).results["summary"]["det"]["score"] == 1.0
    got = run_suite("coco", stub, options).results
    gt = COCO(str(e.path))
    files_of = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
    cat_of = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    dets = []
    for it, answer in zip(items, stub([(it.visual, it.prompt) for it in items])):
        image_id = files_of[str(it.visual).rsplit("/", 1)[1]]
        category = it.sample.targets[0].phrase[:-1]  # "circles" -> "circle"
        for (x1, y1, x2, y2), s in zip(answer.calls[0].boxes, answer.calls[0].scores):
            dets.append({"image_id": image_id, "category_id": cat_of[category], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(s)})
    evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert got["tasks"]["det"]["AP"] == pytest.approx(evaluator.stats[0], abs=1e-9) and got["tasks"]["det"]["AP"] < 1
    assert got["tasks"]["det"]["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-9)
    assert "skipped" in got["tasks"]["mask"]  # boxes only: no mask AP


def test_coco_mask_ap_when_calls_carry_masks(files):
    e = files["coco"]
    scenes, categories, items = coco_items(e.path, e.image_root, n=2)
    by_scene = {str(s.image_path): s for s in scenes}

    def with_masks(batch):
        out = []
        for visual, prompt in batch:
            it = next(i for i in items if str(i.visual) == str(visual) and i.prompt == prompt)
            hits = [o for o in by_scene[str(visual)].objects if o.category + "s" == it.sample.targets[0].phrase]
            call = Call("det", boxes=np.array([o.box for o in hits]).reshape(-1, 4), scores=np.ones(len(hits)))
            call.masks = np.array([o.mask_array() for o in hits]).reshape(-1, *by_scene[str(visual)].hw)
            out.append(Answer("", [call]))
        return out

    results = run_suite("coco", with_masks, EvalOptions(data=e.path, images=e.image_root, n=2, progress=False))
    assert results.results["summary"]["mask"]["score"] == 1.0 and results.results["summary"]["det"]["score"] == 1.0


def test_mot_oracle_per_sequence(files, tmp_path):
    e = files["mot"]
    items = mot_items(e.path, clip_len=4)
    options = EvalOptions(data=e.path, clip_len=4, progress=False)
    report = report_suite("mot", _oracle(items), tmp_path, options)
    results = json.loads(report.json_path.read_text())
    assert results["summary"]["track"]["score"] == pytest.approx(20 / 21)  # IoU 1 > every threshold but 1.0
    assert results["tasks"]["track"]["precision@20"] == 1.0
    sequences = results["sequences"]
    assert sorted(sequences) == [f"SHAPES-{i:04d}" for i in range(5) if any(
        it.sample.meta["sequence"] == f"SHAPES-{i:04d}" for it in items)]
    assert sum(s["tracks"] for s in sequences.values()) == len(items)
    assert {p.name for p in report.plot_paths} == {"tracking_success.png", "tracking_precision.png"}
    assert "| SHAPES-0000 |" in report.markdown_path.read_text()


def test_questions_carry_no_placeholder_and_use_the_first_template(files):
    e = files["coco"]
    _, _, items = coco_items(e.path, e.image_root, n=1)
    assert items[0].prompt == "Find all circles." and "<image>" not in items[0].prompt
    assert all(s.meta["categories"] for s in load_coco(e.path, e.image_root).samples)
