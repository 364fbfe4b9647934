"""Evaluation suites on real-format annotation files: ``refcoco``, ``coco`` and ``mot``.

    taskmllm eval --model DIR --suite refcoco --data refs.json --instances instances.json --image-root images/
    taskmllm eval --model DIR --suite coco --data instances.json --image-root images/
    taskmllm eval --model DIR --suite mot --data MOT17/train

Questions are the first paraphrase of each task in the templates (:mod:`taskmllm.data.templates`), written by the
same builder that trains on these files (:class:`~taskmllm.data.grounded.GroundedBuilder`), without a visual
placeholder (the model's processor places it). Images are passed as paths, so memory stays flat on large sets.

- ``refcoco``: every sentence of every ref (of ``split``; the first ``n`` sentences) is asked twice: a ``seg``
  question scored by **cIoU and gIoU as LISA defines them** (Σ intersection / Σ union over the set; mean
  per-sample IoU, an empty target with an empty prediction counting 1), and a ``rec`` question scored by
  **Acc@0.5** (IoU > 0.5) of the top-scoring box of the first ``<det>`` call. A missing call is an empty mask / no box.
- ``coco``: every image (the first ``n``) is asked "find every <category>" for **every category of the file**, so
  detections of a category absent from an image count as false positives, as in COCO's own protocol (cost:
  images x categories questions). The boxes (with scores) of the first ``<det>`` call are that category's
  detections; **box AP** (AP@[.50:.95], AP50, AP75, ...) via pycocotools. **Mask AP** when the calls also carry
  per-box ``masks`` (the shipped detection expert gives boxes only: then it says so).
- ``mot``: each sequence is cut into clips of ``clip_len`` frames (default the model's ``max_frames``; every
  ``stride``-th frame), and every track visible in a clip's first frame is tracked from its first-frame ``<box>``
  (one-pass evaluation, as LaSOT's): **success AUC and precision@20 px**, per sequence and over all tracks.

Every suite reports ``routing`` (the task tokens emitted equal the reference's) beside its metrics, in the same
layout as ``shapes`` (``summary`` rows, ``tasks`` details) and with its plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from taskmllm.data.coco import load_coco, load_refs
from taskmllm.data.grounded import GroundedBuilder
from taskmllm.data.mot import load_mot, mot_sequences
from taskmllm.data.sample import Sample
from taskmllm.data.templates import load_templates
from taskmllm.errors import DataFormatError
from taskmllm.eval.detection import DetectionGroundTruth, DetectionPrediction, coco_ap
from taskmllm.eval.report import PlotSpec
from taskmllm.eval.suites import Answerer, EvalItem, SuiteOutput, answer_all, score_task, summarize_tasks
from taskmllm.eval.tracking import tracking_metrics

__all__ = ["coco_items", "mot_items", "refcoco_items", "run_coco", "run_mot", "run_refcoco"]

PathLike = Union[str, Path]


def _builder(templates: Optional[PathLike]) -> GroundedBuilder:
    return GroundedBuilder(load_templates(templates))


def _run(answer: Answerer, items: Sequence[EvalItem], batch_size: int, desc: str, progress: bool) -> list:
    return answer_all(answer, [(it.visual, it.prompt) for it in items], batch_size, desc, progress)


# ------------------------------------------------------------------------------------------- refcoco
def refcoco_items(refs_file: PathLike, instances_file: PathLike, image_root: Optional[PathLike] = None,
                  split: Optional[str] = None, n: Optional[int] = None,
                  templates: Optional[PathLike] = None) -> dict[str, list[EvalItem]]:
    """``{"seg": [...], "rec": [...]}``: one question of each per sentence (the first ``n`` sentences).

    Raises:
        DataFormatError: a malformed file (naming the entry), or no ref (of ``split``).
    """
    refs = load_refs(instances_file, refs_file, image_root, split, lazy_masks=True)
    builder = _builder(templates)
    pairs = [(ref, phrase) for ref in refs for phrase in ref.meta["sentences"]][:n]
    if not pairs:
        raise DataFormatError(refs_file, "file", f"no ref{f' of split {split!r}' if split else ''}")
    items: dict[str, list[EvalItem]] = {}
    for task in ("seg", "rec"):
        samples = [builder.refer(ref, task, phrase) for ref, phrase in pairs]
        items[task] = [_item(task, s) for s in samples]
    return items


def _item(task: str, sample: Sample) -> EvalItem:
    question, reference = sample.turns[0]
    visual = [str(p) for p in sample.frame_paths] if sample.frame_paths is not None else str(sample.image_path)
    return EvalItem(task, visual, question, reference, sample)


def run_refcoco(answer: Answerer, refs_file: PathLike, instances_file: PathLike,
                image_root: Optional[PathLike] = None, split: Optional[str] = None, n: Optional[int] = None,
                batch_size: int = 16, progress: bool = True, templates: Optional[PathLike] = None) -> SuiteOutput:
    """The ``refcoco`` suite (see the module doc): cIoU / gIoU of ``seg``, Acc@0.5 of ``rec``."""
    items = refcoco_items(refs_file, instances_file, image_root, split, n, templates)
    per_task = {task: score_task(task, its, _run(answer, its, batch_size, f"refcoco/{task}", progress))
                for task, its in items.items()}
    return SuiteOutput({"suite": "refcoco", "refs": str(refs_file), "instances": str(instances_file),
                        "split": split, "summary": summarize_tasks(per_task, items), "tasks": per_task})


# ---------------------------------------------------------------------------------------------- coco
def coco_items(instances_file: PathLike, image_root: Optional[PathLike] = None, n: Optional[int] = None,
               templates: Optional[PathLike] = None) -> tuple[list[Sample], list[str], list[EvalItem]]:
    """The first ``n`` images, the file's categories, and one ``det`` question per (image, category)."""
    scenes = load_coco(instances_file, image_root, keep_empty=True, lazy_masks=True).samples[:n]
    if not scenes:
        raise DataFormatError(instances_file, "file", "no images")
    categories = list(scenes[0].meta["categories"])
    builder = _builder(templates)
    items = [_item("det", builder.detect(scene, builder.phrase(c))) for scene in scenes for c in categories]
    return scenes, categories, items


def _calls(result: Any, task: str) -> Any:
    return next((c for c in result.calls if c.task == task), None)


def _masks(call: Any) -> Optional[np.ndarray]:
    """Per-box ``(M, H, W)`` masks of a detection call, when its expert gives them."""
    masks = getattr(call, "masks", None)
    return masks if masks is not None else getattr(getattr(call, "output", None), "masks", None)


def _detections(calls: Sequence[Any], hw: tuple[int, int]) -> DetectionPrediction:
    """One image's detections: call ``k`` (or None) answered category ``k``; masks only when every call with a
    box gives them."""
    boxes, scores, labels, masks = [], [], [], []
    for k, call in enumerate(calls):
        got = np.zeros((0, 4)) if call is None or call.boxes is None else np.asarray(call.boxes, np.float64)
        boxes.append(got.reshape(-1, 4))
        scores.append(np.ones(len(got)) if call is None or call.scores is None else np.asarray(call.scores))
        labels.append(np.full(len(got), k, np.int64))
        mask = None if call is None else _masks(call)
        masks.append(np.zeros((0, *hw), bool) if len(got) == 0 else
                     None if mask is None else np.asarray(mask, bool).reshape(-1, *hw))
    stacked = None if any(m is None for m in masks) else np.concatenate(masks)
    return DetectionPrediction(np.concatenate(boxes), np.concatenate(scores).reshape(-1), np.concatenate(labels),
                               stacked)


def run_coco(answer: Answerer, instances_file: PathLike, image_root: Optional[PathLike] = None,
             n: Optional[int] = None, batch_size: int = 16, progress: bool = True,
             templates: Optional[PathLike] = None) -> SuiteOutput:
    """The ``coco`` suite (see the module doc): box AP over every category of the file; mask AP with masks."""
    scenes, categories, items = coco_items(instances_file, image_root, n, templates)
    results = _run(answer, items, batch_size, "coco/det", progress)
    label = {c: k for k, c in enumerate(categories)}
    gts, dets = [], []
    for i, scene in enumerate(scenes):
        h, w = scene.hw
        gts.append(DetectionGroundTruth(np.array([o.box for o in scene.objects], np.float64).reshape(-1, 4),
                                        np.array([label[o.category] for o in scene.objects], np.int64), h, w,
                                        np.array([o.mask_array() for o in scene.objects], bool).reshape(-1, h, w)))
        calls = [_calls(r, "det") for r in results[i * len(categories):(i + 1) * len(categories)]]
        dets.append(_detections(calls, (h, w)))
    if not any(len(g.boxes) for g in gts):
        raise DataFormatError(instances_file, "file", "no annotated instance in the evaluated images")
    box = coco_ap(gts, dets, "bbox")
    tasks: dict[str, Any] = {"det": {"routing": score_task("det", items, results)["routing"], **box}}
    with_masks = all(d.masks is not None for d in dets) and any(len(d.masks) for d in dets)
    tasks["mask"] = coco_ap(gts, dets, "segm") if with_masks else {
        "skipped": "the detection calls gave no per-box masks: no mask AP"}
    summary = {"det": {"n": len(items), "routing": tasks["det"]["routing"], "metric": "box AP", "score": box["AP"]}}
    if "AP" in tasks["mask"]:
        summary["mask"] = {"n": len(items), "routing": tasks["det"]["routing"], "metric": "mask AP",
                           "score": tasks["mask"]["AP"]}
    return SuiteOutput({"suite": "coco", "instances": str(instances_file), "n_images": len(scenes),
                        "categories": categories, "summary": summary, "tasks": tasks},
                       [PlotSpec("detection_pr", {"box": box})])


# ----------------------------------------------------------------------------------------------- mot
def mot_items(path: PathLike, clip_len: int, stride: int = 1, n: Optional[int] = None,
              templates: Optional[PathLike] = None) -> list[EvalItem]:
    """One ``track_box`` question per track visible in the first frame of a clip (the first ``n``)."""
    builder = _builder(templates)
    items: list[EvalItem] = []
    for seq in mot_sequences(path):  # DataFormatError: neither a sequence nor a folder of them
        for clip in load_mot(seq, clip_len=clip_len, stride=stride):
            items += [_item("track_box", builder.track_from_box(clip, o)) for o in clip.objects if o.visible[0]]
    if not items:
        raise DataFormatError(path, "file", "no track is visible in the first frame of any clip")
    return items[:n]


def run_mot(answer: Answerer, path: PathLike, clip_len: int = 8, stride: int = 1, n: Optional[int] = None,
            batch_size: int = 16, progress: bool = True, templates: Optional[PathLike] = None) -> SuiteOutput:
    """The ``mot`` suite (see the module doc): success AUC and precision@20 px per sequence and overall."""
    items = mot_items(path, clip_len, stride, n, templates)
    results = _run(answer, items, batch_size, "mot/track", progress)
    overall = score_task("track_box", items, results)
    per_sequence: dict[str, dict[str, Any]] = {}
    for seq in dict.fromkeys(it.sample.meta["sequence"] for it in items):
        keep = [i for i, it in enumerate(items) if it.sample.meta["sequence"] == seq]
        m = score_task("track_box", [items[i] for i in keep], [results[i] for i in keep])
        per_sequence[seq] = {"tracks": len(keep), "routing": m["routing"], "success_auc": m["success_auc"],
                             "precision@20": m["precision@20"]}
    summary = {"track": {"n": len(items), "routing": overall["routing"], "metric": "success AUC",
                         "score": overall["success_auc"]}}
    return SuiteOutput({"suite": "mot", "path": str(path), "clip_len": clip_len, "stride": stride,
                        "summary": summary, "sequences": per_sequence, "tasks": {"track": overall}},
                       [PlotSpec("tracking_success", {"all": overall}),
                        PlotSpec("tracking_precision", {"all": overall})])
