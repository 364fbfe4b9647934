"""Real-data runners read small fixture files in the published formats (POPE jsonl, COCO instances/captions)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from taskmllm.errors import ConfigError, DataFormatError, ImageError
from taskmllm.eval.benchmarks import EvalOptions, report_suite, run_suite
from taskmllm.eval.realdata import CHAIR_PROMPT, read_pope_questions, run_chair, run_pope


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(path)


def _pope_file(path: Path, rows: list[tuple[int, str, str, str]]) -> Path:
    # The POPE repository's coco_pope_*.json: one JSON object per line.
    path.write_text("\n".join(json.dumps({"question_id": q, "image": img, "text": text, "label": label})
                              for q, img, text, label in rows) + "\n")
    return path


@pytest.fixture()
def pope_files(tmp_path):
    images = tmp_path / "val2014"
    for i in (1, 2):
        _png(images / f"COCO_val2014_{i:012d}.jpg".replace(".jpg", ".png"), 40 * i)
    img1, img2 = "COCO_val2014_000000000001.png", "COCO_val2014_000000000002.png"
    random = _pope_file(tmp_path / "coco_pope_random.json", [
        (1, img1, "Is there a dog in the image?", "yes"), (2, img1, "Is there a car in the image?", "no"),
        (3, img2, "Is there a cat in the image?", "yes"), (4, img2, "Is there a bus in the image?", "no")])
    adversarial = _pope_file(tmp_path / "coco_pope_adversarial.json", [
        (1, img1, "Is there a dog in the image?", "yes"), (2, img1, "Is there a person in the image?", "no")])
    return images, random, adversarial


# Scripted answers per question text: random gets tp, fn, tn, fp = 1 each; adversarial is all correct.
SCRIPT = {"Is there a dog in the image?": "Yes, there is a dog.", "Is there a car in the image?": "No.",
          "Is there a cat in the image?": "No, there is not.", "Is there a bus in the image?": "Yes.",
          "Is there a person in the image?": "There is no person."}


def test_pope_runner_reads_question_files_and_scores_them(pope_files):
    images, random, adversarial = pope_files
    seen = []

    def answer(batch):
        seen.extend(batch)
        return [SimpleNamespace(text=SCRIPT[p.split("\n")[0]], calls=[]) for _, p in batch]

    out = run_pope(answer, [random, adversarial], images, batch_size=3, progress=False)
    splits = out.results["pope"]["splits"]
    assert list(splits) == ["random", "adversarial"]
    r = splits["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1)
    assert r["accuracy"] == r["precision"] == r["recall"] == r["f1"] == r["yes_ratio"] == 0.5
    a = splits["adversarial"]
    assert a["accuracy"] == 1.0 and a["f1"] == 1.0 and a["yes_ratio"] == 0.5
    assert out.results["pope"]["mean_f1"] == pytest.approx(0.75)
    assert seen[0] == (str(images / "COCO_val2014_000000000001.png"), "Is there a dog in the image?")  # the model places the image
    assert len(seen) == 6 and out.plots[0].kind == "pope_yes_ratio"
    assert run_pope(answer, [random], images, n=2, progress=False).results["pope"]["splits"]["random"]["n"] == 2


def test_pope_runner_errors_name_the_problem(pope_files, tmp_path):
    images, random, _ = pope_files
    bad = tmp_path / "coco_pope_popular.json"
    bad.write_text(random.read_text() + '{"question_id": 9, "image": "x.png", "text": "Is there?"}\n')
    with pytest.raises(DataFormatError, match="line 5.*label"):
        read_pope_questions(bad)
    bad.write_text('{"question_id": 9, "image": "x.png", "text": "Is there?", "label": "maybe"}\n')
    with pytest.raises(DataFormatError, match="line 1.*yes"):
        read_pope_questions(bad)
    with pytest.raises(ImageError, match="not found"):
        run_pope(lambda b: [], [random], tmp_path / "nowhere", progress=False)
    with pytest.raises(ConfigError, match="question files"):
        run_suite("pope", lambda b: [], EvalOptions(progress=False))


def _coco(tmp_path: Path) -> tuple[Path, Path, Path]:
    images = tmp_path / "val2014"
    _png(images / "a.png", 10)
    _png(images / "b.png", 200)
    square = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    instances = {
        "images": [{"id": 1, "file_name": "a.png", "height": 24, "width": 32},
                   {"id": 2, "file_name": "b.png", "height": 24, "width": 32}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}, {"id": 1, "name": "person"},
                       {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [2, 2, 10, 10], "segmentation": square,
             "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 17, "bbox": [2, 2, 10, 10], "segmentation": square,
             "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10], "segmentation": square,
             "area": 100, "iscrowd": 0}],
    }
    captions = {"images": instances["images"], "annotations": [
        {"id": 10, "image_id": 1, "caption": "A dog lies on a sofa next to a person."},
        {"id": 11, "image_id": 2, "caption": "A cat sitting in a window."}]}
    inst_path, cap_path = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    inst_path.write_text(json.dumps(instances))
    cap_path.write_text(json.dumps(captions))
    return inst_path, cap_path, images


def test_chair_runner_uses_instances_and_reference_captions(tmp_path):
    instances, captions, images = _coco(tmp_path)
    # image 1: ground truth {dog (instance), person (reference caption)}; image 2: {cat, person}
    scripted = {"a.png": "A dog and a person and a cat.", "b.png": "Two cats and a car, and cars."}
    prompts = []

    def answer(batch):
        prompts.extend(p for _, p in batch)
        return [SimpleNamespace(text=scripted[Path(v).name], calls=[]) for v, _ in batch]

    out = run_chair(answer, instances, captions, images, progress=False)
    m = out.results["chair"]
    # mentions: dog, person, cat* | cat, car*, car* -> 3 hallucinated of 6; both captions hallucinate
    assert m["chair_s"] == 1.0 and m["chair_i"] == pytest.approx(3 / 6)
    assert m["recall"] == pytest.approx(3 / 4)  # dog, person | cat found; person of image 2 missed
    assert m["per_caption"][0]["hallucinated"] == ["cat"] and m["image_ids"] == [1, 2]
    assert prompts == [CHAIR_PROMPT] * 2  # the model's processor adds the image where the model expects it
    # without reference captions the person of image 1 is no longer ground truth
    m2 = run_chair(answer, instances, None, images, progress=False).results["chair"]
    assert m2["chair_i"] == pytest.approx(4 / 6)
    # synonyms extend the vocabulary; n samples images
    m3 = run_chair(lambda b: [SimpleNamespace(text="A puppy.", calls=[]) for _ in b], instances, captions, images,
                   n=1, seed=0, synonyms={"dog": ["puppy"]}, progress=False).results["chair"]
    assert m3["n_captions"] == 1 and m3["n_mentions"] == 1


def test_chair_suite_writes_a_report(tmp_path):
    instances, captions, images = _coco(tmp_path)
    options = EvalOptions(instances=instances, captions=captions, images=images, progress=False)
    report = report_suite("chair", lambda b: [SimpleNamespace(text="A dog.", calls=[]) for _ in b],
                          tmp_path / "out", options)
    results = json.loads(report.json_path.read_text())
    assert results["suite"] == "chair" and results["chair"]["chair_s"] == 0.5
    assert "chair_s" in report.markdown_path.read_text()
    with pytest.raises(DataFormatError):
        run_chair(lambda b: [], tmp_path / "missing.json", progress=False)
