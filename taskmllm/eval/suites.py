"""ShapesWorld evaluation suites: ``shapes`` (every task + held-out compositions), ``pope-shapes``, ``chair-shapes``.

Every suite takes an **answer function** ``answer(batch) -> results``: ``batch`` is a list of
``(visual, prompt)`` pairs (an ``(H, W, 3)`` uint8 image or a list of frames, and a prompt in the token
protocol, as a user types it: without the ``<image>`` / ``<video>`` placeholder, which the model's processor puts
where the model was trained to see it, ``tokens.image_first``) and the answer is one Result-like object per
pair — anything with ``.text`` (the answer without protocol tokens) and ``.calls`` (objects with ``.task``,
``.mask``, ``.boxes``, ``.scores`` as
:class:`~taskmllm.router.result.CallResult`). :func:`pipeline_answerer` makes one from a
:class:`~taskmllm.router.pipeline.Pipeline`; tests inject stubs (an oracle, an always-"yes" model).

Scoring conventions of ``shapes`` (per task, on ``n`` questions of the ``test`` split drawn with ``seed``):

- routing: the task tokens the model emitted (one per call, in order) must equal those of the reference answer;
  questions that need no expert (VQA, caption) also report their ``false_call_rate`` (answers with any task
  token), and the suite's ``routing`` block sums both up (:func:`routing_summary`);
- ``exist``/``color``/``shape``/``count``/``relation``: exact match after
  :func:`~taskmllm.eval.vqa.normalize_answer`; ``caption``: CHAIR against the objects present;
- ``seg``: cIoU/gIoU of the first ``seg`` call's mask; ``rec``: Acc@0.5 of the first ``det`` call's
  top-scoring box; ``det``: class-agnostic COCO AP of the first ``det`` call's boxes (each question is one
  "image" whose ground truth is the set of objects its phrase names); ``track``/``track_box``: OPE success AUC
  and precision@20 px of the first ``track`` call; ``temporal``: R@1 of the interval parsed from
  ``"From frame a to frame b."`` (frames inclusive, scored as ``[a, b + 1)``).
- a missing call is a miss (empty mask, no box, lost track); an unparseable interval has IoU 0.

``heldout`` repeats the image tasks on the ``heldout`` split, where every scene contains at least one
color-shape composition never drawn in training (the questions are not restricted to that object).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
from tqdm.auto import tqdm

from taskmllm.data.chair import chair_ground_truth
from taskmllm.data.pope import POPE_SPLITS, CooccurrenceStats, pope_samples
from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld import (CHAIR_SYNONYMS, IMAGE_TASKS, VIDEO_TASKS, ConversationBuilder,
                                      ConversationConfig, ShapesWorld, WorldConfig)
from taskmllm.errors import ConfigError, MetricInputError
from taskmllm.eval.detection import DetectionGroundTruth, DetectionPrediction, coco_ap
from taskmllm.eval.grounding import rec_accuracy, referring_segmentation, temporal_grounding
from taskmllm.eval.hallucination import ChairVocabulary, chair, pope_summary
from taskmllm.eval.report import PlotSpec
from taskmllm.eval.routing import routing_accuracy
from taskmllm.eval.tracking import tracking_metrics
from taskmllm.eval.vqa import vqa_accuracy
from taskmllm.model.tokens import task_token

__all__ = ["DEFAULT_EVAL_SEED", "HELDOUT_TASKS", "SHAPES_TASKS", "Answerer", "EvalItem", "SuiteOutput",
           "answer_all", "pipeline_answerer", "pope_shapes_samples", "run_chair_shapes", "run_pope_shapes", "run_shapes",
           "routing_summary", "score_task", "shapes_items", "summarize_tasks"]

#: Seed of the evaluation worlds; training uses small seeds (default 0), so these scenes are never seen.
DEFAULT_EVAL_SEED = 1_000_003
SHAPES_TASKS: tuple[str, ...] = IMAGE_TASKS + VIDEO_TASKS
HELDOUT_TASKS: tuple[str, ...] = ("caption", "exist", "color", "shape", "count", "seg", "rec", "det")
VQA_TASKS = ("exist", "color", "shape", "count", "relation")
#: the tasks whose questions need no expert (their references have no task token): the false-call rate's questions
NO_CALL_TASKS = VQA_TASKS + ("caption",)
EXPERT_OF = {"seg": "seg", "rec": "det", "det": "det", "track": "track", "track_box": "track"}
_TASK_TOKEN_RE = re.compile("|".join(re.escape(task_token(t)) for t in sorted(set(EXPERT_OF.values()))))
_INTERVAL_RE = re.compile(r"frame\s+(\d+)\s+to\s+frame\s+(\d+)", re.IGNORECASE)


class CallLike(Protocol):
    """What the suites read of a task call (see :class:`~taskmllm.router.result.CallResult`)."""

    task: str
    mask: Optional[np.ndarray]
    boxes: Optional[np.ndarray]
    scores: Optional[np.ndarray]


class ResultLike(Protocol):
    """What the suites read of an answer (see :class:`~taskmllm.router.result.Result`)."""

    text: str
    calls: Sequence[CallLike]


Answerer = Callable[[Sequence[tuple[Any, str]]], Sequence[ResultLike]]


@dataclass(frozen=True)
class EvalItem:
    """One question: its task, the visual and prompt given to the model, the reference answer and the sample."""

    task: str
    visual: Any
    prompt: str
    reference: str
    sample: Sample


@dataclass
class SuiteOutput:
    """What a suite returns: the results dict (for :func:`~taskmllm.eval.report.write_report`) and its plots."""

    results: dict[str, Any]
    plots: list[PlotSpec] = field(default_factory=list)


def pipeline_answerer(pipe: Any, max_new_tokens: int = 48, intervention: Any = None,
                      score_threshold: float = 0.0, **generation: Any) -> Answerer:
    """The answer function of a :class:`~taskmllm.router.pipeline.Pipeline` (one batched call per batch);
    ``generation``: further ``generate`` options (``repetition_penalty``, ``no_repeat_ngram_size``, ...).

    Every detection slot is kept with its score (``score_threshold`` 0): COCO AP ranks them, as DETR's
    evaluation does, and REC takes the top-scoring box; a user-facing threshold would only remove recall.
    """
    def answer(batch: Sequence[tuple[Any, str]]) -> Sequence[ResultLike]:
        visuals = [v for v, _ in batch]
        prompts = [p for _, p in batch]
        return pipe(visuals, prompts, max_new_tokens=max_new_tokens, intervention=intervention,
                    score_threshold=score_threshold, **generation)

    return answer


def answer_all(answer: Answerer, pairs: Sequence[tuple[Any, str]], batch_size: int = 16,
               desc: str = "eval", progress: bool = True) -> list[ResultLike]:
    """Run ``answer`` over ``pairs`` in batches of ``batch_size`` with a tqdm progress bar.

    Raises:
        MetricInputError: the answer function returned a different number of results than it was asked.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out: list[ResultLike] = []
    with tqdm(total=len(pairs), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            batch = list(pairs[start:start + batch_size])
            results = list(answer(batch))
            if len(results) != len(batch):
                raise MetricInputError(f"{desc}: answer function returned {len(results)} results for "
                                       f"{len(batch)} questions")
            out += results
            bar.update(len(batch))
    return out


# ------------------------------------------------------------------------------------------- items


def shapes_items(task: str, n: int, seed: int = DEFAULT_EVAL_SEED, world: Optional[WorldConfig] = None,
                 split: str = "test") -> list[EvalItem]:
    """``n`` questions of ``task`` about scenes of ``split`` of ``ShapesWorld(world, seed)`` (deterministic).

    Raises:
        ConfigError: ``n < 1``, an unknown task, or scenes that cannot support ``task`` often enough.
    """
    if task not in SHAPES_TASKS:
        raise ConfigError(f"unknown ShapesWorld task {task!r}; known: {SHAPES_TASKS}")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    shapes_world = ShapesWorld(world or WorldConfig(), seed=seed)
    builder = ConversationBuilder(ConversationConfig(question_first=None))  # the model places the image
    video = task in VIDEO_TASKS
    items: list[EvalItem] = []
    for i in range(20 * n):
        scene = shapes_world.video(i, split) if video else shapes_world.image(i, split)
        sample = builder.build(scene, task, np.random.default_rng([seed, SHAPES_TASKS.index(task), i]))
        if sample is not None:
            question, reference = sample.turns[0]
            visual = list(sample.frames) if video else sample.image
            items.append(EvalItem(task, visual, question, reference, sample))
            if len(items) == n:
                return items
    raise ConfigError(f"only {len(items)} of {n} {task!r} questions could be built from {20 * n} scenes")


# ----------------------------------------------------------------------------------------- scoring


def _first_call(result: ResultLike, task: str) -> Optional[CallLike]:
    return next((c for c in result.calls if c.task == EXPERT_OF[task]), None)


def _scale(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([w, h, w, h], np.float64)


def _valid_boxes(boxes: Any) -> np.ndarray:
    """Predicted boxes as ``(M, 4)`` xyxy with ordered corners (a model may emit x2 < x1)."""
    arr = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4)
    return np.concatenate([np.minimum(arr[:, :2], arr[:, 2:]), np.maximum(arr[:, :2], arr[:, 2:])], axis=1)


def _interval(text: str) -> tuple[float, float]:
    """``"From frame a to frame b."`` as the half-open ``(a, b + 1)``; ``(-1, 0)`` (IoU 0) when unparseable."""
    m = _INTERVAL_RE.search(text)
    if m is None or int(m.group(2)) < int(m.group(1)):
        return (-1.0, 0.0)
    return (float(m.group(1)), float(m.group(2)) + 1.0)


def _routing(items: Sequence[EvalItem], results: Sequence[ResultLike]) -> dict[str, Any]:
    expected = [_TASK_TOKEN_RE.findall(it.reference) for it in items]
    emitted = [[task_token(c.task) for c in r.calls] for r in results]
    return routing_accuracy(expected, emitted)


def _track_pred(call: Optional[CallLike], t_len: int) -> np.ndarray:
    pred = np.full((t_len, 4), np.nan)
    if call is not None and call.boxes is not None:
        boxes = _valid_boxes(call.boxes)[:t_len]
        pred[:len(boxes)] = boxes
    return pred


def score_task(task: str, items: Sequence[EvalItem], results: Sequence[ResultLike]) -> dict[str, Any]:
    """The metrics of one ShapesWorld task (see the module doc), plus ``"routing"`` accuracy."""
    if len(items) != len(results) or not items:
        raise MetricInputError(f"{task}: {len(items)} items vs {len(results)} results")
    routing = float(_routing(items, results)["accuracy"])
    if task in VQA_TASKS:
        out: dict[str, Any] = vqa_accuracy([r.text for r in results], [it.reference for it in items])
    elif task == "caption":
        vocab = ChairVocabulary.from_synonyms(CHAIR_SYNONYMS)
        out = chair([r.text for r in results], [chair_ground_truth(it.sample) for it in items], vocab)
    if task in NO_CALL_TASKS:  # questions that need no expert: any task token is a false call
        out["false_call_rate"] = sum(bool(r.calls) for r in results) / len(results)
    elif task == "seg":
        preds, targets = [], []
        for it, r in zip(items, results):
            call = _first_call(r, task)
            target = np.asarray(it.sample.targets[0].mask, bool)
            mask = None if call is None else call.mask
            preds.append(np.zeros_like(target) if mask is None else np.asarray(mask, bool))
            targets.append(target)
        out = referring_segmentation(preds, targets)
    elif task == "rec":
        preds = np.full((len(items), 4), np.nan)
        for i, r in enumerate(results):
            call = _first_call(r, task)
            boxes = _valid_boxes(None if call is None else call.boxes)
            if len(boxes):
                scores = np.zeros(len(boxes)) if call.scores is None else np.asarray(call.scores, np.float64)
                preds[i] = boxes[int(np.argmax(scores))]
        targets = np.concatenate([_scale(it.sample.targets[0].boxes, it.sample.hw) for it in items])
        out = rec_accuracy(preds, targets)
    elif task == "det":
        gts, dets = [], []
        for it, r in zip(items, results):
            h, w = it.sample.hw
            gt = _scale(it.sample.targets[0].boxes, (h, w))
            gts.append(DetectionGroundTruth(gt, np.zeros(len(gt), np.int64), h, w))
            call = _first_call(r, task)
            boxes = _valid_boxes(None if call is None else call.boxes)
            scores = np.ones(len(boxes)) if call is None or call.scores is None else np.asarray(call.scores)
            dets.append(DetectionPrediction(boxes, scores.reshape(-1)[:len(boxes)], np.zeros(len(boxes), np.int64)))
        if not any(len(g.boxes) for g in gts):
            out = {"skipped": "no question has a ground-truth object", "n": len(items)}
        else:
            out = coco_ap(gts, dets, class_agnostic=True)
    elif task in ("track", "track_box"):
        preds, gts, vis = [], [], []
        for it, r in zip(items, results):
            target = it.sample.targets[0]
            gt = _scale(target.boxes, it.sample.hw)
            preds.append(_track_pred(_first_call(r, task), len(gt)))
            gts.append(gt)
            vis.append(np.asarray(target.visible, bool))
        out = tracking_metrics(preds, gts, vis)
    elif task == "temporal":
        preds = [_interval(r.text) for r in results]
        targets = [_interval(it.reference) for it in items]
        out = temporal_grounding(preds, targets)
    else:
        raise ConfigError(f"no scoring rule for task {task!r}")
    return {"routing": routing, **out}


_HEADLINE = {"caption": ("CHAIR_S", "chair_s"), "seg": ("cIoU", "ciou"), "rec": ("Acc@0.5", "acc@0.5"),
             "det": ("AP", "AP"), "track": ("success AUC", "success_auc"),
             "track_box": ("success AUC", "success_auc"), "temporal": ("R@1 IoU0.5", "r1@0.5")}


def summarize_tasks(per_task: dict[str, dict[str, Any]],
                    items: dict[str, list[EvalItem]]) -> dict[str, dict[str, Any]]:
    """One row per task: its number of questions, routing accuracy, headline metric's name and score."""
    rows = {}
    for task, metrics in per_task.items():
        name, key = _HEADLINE.get(task, ("accuracy", "accuracy"))
        rows[task] = {"n": len(items[task]), "routing": metrics["routing"], "metric": name,
                      "score": metrics.get(key)}
    return rows


def routing_summary(per_task: dict[str, dict[str, Any]], items: dict[str, list[EvalItem]]) -> dict[str, Any]:
    """Routing over the suite: ``task_questions`` — the routing accuracy of the questions that need an expert
    (their references call one), ``false_call_rate`` — the fraction of the questions that need none (VQA and
    caption) whose answer emitted a task token anyway; each with its number of questions."""
    def mean(tasks: list[str], key: str) -> Optional[float]:
        n = sum(len(items[t]) for t in tasks)
        return sum(per_task[t][key] * len(items[t]) for t in tasks) / n if n else None

    expert = [t for t in per_task if t in EXPERT_OF]
    plain = [t for t in per_task if t in NO_CALL_TASKS]
    return {"task_questions": mean(expert, "routing"), "n_task_questions": sum(len(items[t]) for t in expert),
            "false_call_rate": mean(plain, "false_call_rate"), "n_no_call_questions": sum(len(items[t]) for t in plain)}


# ------------------------------------------------------------------------------------------- suites


def _run_tasks(answer: Answerer, tasks: Sequence[str], n: int, seed: int, world: Optional[WorldConfig],
               split: str, batch_size: int, progress: bool) -> tuple[dict, dict]:
    items = {t: shapes_items(t, n, seed, world, split) for t in tasks}
    per_task = {}
    for task in tasks:
        pairs = [(it.visual, it.prompt) for it in items[task]]
        results = answer_all(answer, pairs, batch_size, f"{split}/{task}", progress)
        per_task[task] = score_task(task, items[task], results)
    return per_task, items


def run_shapes(answer: Answerer, n: int = 200, seed: int = DEFAULT_EVAL_SEED, world: Optional[WorldConfig] = None,
               batch_size: int = 16, tasks: Sequence[str] = SHAPES_TASKS,
               heldout_tasks: Sequence[str] = HELDOUT_TASKS, progress: bool = True) -> SuiteOutput:
    """The ``shapes`` suite: ``n`` questions per task on the test split, and per held-out task on ``heldout``.

    Results: ``summary`` / ``heldout_summary`` (one row per task: n, routing, headline metric and score),
    ``tasks`` / ``heldout`` (every metric per task). Plots: detection precision-recall, tracking success and
    precision.
    """
    per_task, items = _run_tasks(answer, tasks, n, seed, world, "test", batch_size, progress)
    held, held_items = _run_tasks(answer, heldout_tasks, n, seed, world, "heldout", batch_size, progress)
    results: dict[str, Any] = {"suite": "shapes", "n_per_task": n, "seed": seed,
                               "summary": summarize_tasks(per_task, items),
                               "routing": routing_summary(per_task, items)}
    if held:
        results["heldout_summary"] = summarize_tasks(held, held_items)
    results["tasks"] = per_task
    if held:
        results["heldout"] = held
    plots = []
    det_runs = {name: res["det"] for name, res in (("test", per_task), ("heldout", held))
                if "pr_curve" in res.get("det", {})}
    if det_runs:
        plots.append(PlotSpec("detection_pr", det_runs))
    track_runs = {t: per_task[t] for t in ("track", "track_box") if t in per_task}
    if track_runs:
        plots += [PlotSpec("tracking_success", track_runs), PlotSpec("tracking_precision", track_runs)]
    return SuiteOutput(results, plots)


def pope_shapes_samples(n: int = 200, seed: int = DEFAULT_EVAL_SEED, world: Optional[WorldConfig] = None,
                        per_image: int = 3, split: str = "test") -> dict[str, list[Sample]]:
    """POPE samples ``{pope split: [Sample, ...]}`` of ``n`` scenes of ``split`` (co-occurrence counted over those
    scenes, as POPE does over its images); up to ``per_image`` yes and as many no questions per image and split.
    Each sample's ``meta["label"]`` is ``"yes"`` or ``"no"``."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    shapes_world = ShapesWorld(world or WorldConfig(), seed=seed)
    scenes = [shapes_world.image(i, split) for i in range(n)]
    stats = CooccurrenceStats.from_samples(scenes, shapes_world.config.shapes)
    return {s: pope_samples(scenes, s, stats, per_image=per_image, seed=seed, question_first=None)
            for s in POPE_SPLITS}


def run_pope_shapes(answer: Answerer, n: int = 200, seed: int = DEFAULT_EVAL_SEED,
                    world: Optional[WorldConfig] = None, batch_size: int = 16, per_image: int = 3,
                    progress: bool = True, split: str = "test") -> SuiteOutput:
    """POPE random / popular / adversarial on ``n`` scenes of ``split`` (:func:`pope_shapes_samples`)."""
    splits = {}
    for pope_split, samples in pope_shapes_samples(n, seed, world, per_image, split).items():
        results = answer_all(answer, [(s.image, s.turns[0][0]) for s in samples], batch_size, f"pope/{pope_split}",
                             progress)
        splits[pope_split] = ([r.text for r in results], [s.meta["label"] for s in samples])
    summary = pope_summary(splits)
    return SuiteOutput({"suite": "pope-shapes", "n_images": n, "seed": seed, "pope": summary},
                       [PlotSpec("pope_yes_ratio", {"model": summary})])


def run_chair_shapes(answer: Answerer, n: int = 200, seed: int = DEFAULT_EVAL_SEED,
                     world: Optional[WorldConfig] = None, batch_size: int = 16, progress: bool = True,
                     split: str = "test") -> SuiteOutput:
    """CHAIR_S / CHAIR_I / recall / length of captions of ``n`` scenes of ``split`` (one caption question each)."""
    items = shapes_items("caption", n, seed, world, split)
    results = answer_all(answer, [(it.visual, it.prompt) for it in items], batch_size, "chair", progress)
    metrics = score_task("caption", items, results)
    return SuiteOutput({"suite": "chair-shapes", "n_images": n, "seed": seed, "chair": metrics})
