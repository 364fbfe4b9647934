"""ShapesWorld suites against oracles: a perfect answerer, one that never calls an expert, an always-"yes" one."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from taskmllm.data.shapesworld import WorldConfig
from taskmllm.errors import MetricInputError
from taskmllm.eval.benchmarks import EvalOptions, report_suite, run_suite
from taskmllm.eval.suites import (EXPERT_OF, HELDOUT_TASKS, SHAPES_TASKS, answer_all, run_shapes, score_task,
                                  shapes_items)
from taskmllm.model.tokens import strip_protocol

WORLD = WorldConfig(image_size=64, num_frames=4, backgrounds=("plain",), use_photos=False)
SEED = 77
N = 4


def _key(visual, prompt: str) -> tuple[str, str]:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(visual)).tobytes()).hexdigest(), prompt


def _oracle_result(item):
    """What a perfect model answers: the reference text and the ground truth as expert output."""
    calls = []
    h, w = item.sample.hw
    scale = np.array([w, h, w, h], np.float64)
    for target in item.sample.targets:
        task = target.task
        if task == "seg":
            calls.append(SimpleNamespace(task="seg", mask=np.asarray(target.mask, bool), boxes=None, scores=None))
        elif task == "det":
            boxes = np.asarray(target.boxes, np.float64).reshape(-1, 4) * scale
            calls.append(SimpleNamespace(task="det", mask=None, boxes=boxes, scores=np.linspace(1, 0.5, len(boxes))))
        elif task == "track":
            boxes = np.asarray(target.boxes, np.float64) * scale
            calls.append(SimpleNamespace(task="track", mask=None, boxes=boxes, scores=target.visible.astype(float)))
    return SimpleNamespace(text=strip_protocol(item.reference, ("seg", "det", "track")), calls=calls)


@pytest.fixture(scope="module")
def oracle():
    table = {}
    for split, tasks in (("test", SHAPES_TASKS), ("heldout", HELDOUT_TASKS)):
        for task in tasks:
            for item in shapes_items(task, N, SEED, WORLD, split):
                table[_key(item.visual, item.prompt)] = _oracle_result(item)

    def answer(batch):
        return [table[_key(v, p)] for v, p in batch]

    return answer


def test_items_are_deterministic_and_held_out_scenes_differ():
    a = shapes_items("seg", 3, SEED, WORLD)
    b = shapes_items("seg", 3, SEED, WORLD)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert all(np.array_equal(x.visual, y.visual) for x, y in zip(a, b))
    other = shapes_items("seg", 3, SEED + 1, WORLD)
    assert not all(np.array_equal(x.visual, y.visual) for x, y in zip(a, other))
    held = shapes_items("exist", 3, SEED, WORLD, split="heldout")
    pairs = {(o.color, o.category) for it in held for o in it.sample.objects}
    assert pairs & set(WORLD.heldout)  # every held-out scene shows a composition training never drew


def test_oracle_scores_perfectly_on_every_task(oracle):
    out = run_shapes(oracle, n=N, seed=SEED, world=WORLD, batch_size=3, progress=False)
    tasks, held = out.results["tasks"], out.results["heldout"]
    assert set(tasks) == set(SHAPES_TASKS) and set(held) == set(HELDOUT_TASKS)
    for task, row in out.results["summary"].items():
        assert row["routing"] == 1.0 and row["n"] == N, task
    for task in ("exist", "color", "shape", "count", "relation"):
        assert tasks[task]["accuracy"] == 1.0
    assert tasks["seg"]["ciou"] == 1.0 and tasks["seg"]["giou"] == 1.0
    assert tasks["rec"]["acc@0.5"] == 1.0
    assert tasks["det"]["AP"] == pytest.approx(1.0) and tasks["det"]["AP50"] == pytest.approx(1.0)
    for task in ("track", "track_box"):  # success at IoU > 1.0 is impossible: AUC of a perfect tracker = 20/21
        assert tasks[task]["success_auc"] == pytest.approx(20 / 21) and tasks[task]["precision@20"] == 1.0
    assert tasks["temporal"]["r1@0.7"] == 1.0 and tasks["temporal"]["miou"] == 1.0
    assert tasks["caption"]["chair_s"] == 0.0 and tasks["caption"]["recall"] == 1.0
    assert held["seg"]["giou"] == 1.0 and held["color"]["accuracy"] == 1.0
    assert [p.kind for p in out.plots] == ["detection_pr", "tracking_success", "tracking_precision"]
    routing = out.results["routing"]
    assert routing["task_questions"] == 1.0 and routing["false_call_rate"] == 0.0
    assert routing["n_task_questions"] == 5 * N and routing["n_no_call_questions"] == 6 * N
    from taskmllm.eval.report import render_markdown

    assert "| false_call_rate | 0" in render_markdown(out.results)  # results.md has the routing block


def test_false_call_rate_counts_task_tokens_on_questions_that_need_no_expert():
    """Of 4 exist questions and 4 captions, 1 + 2 answers call an expert: rate 3/8 over the suite, per task 1/4
    and 2/4; answers on expert questions do not enter it, and the rate is reported beside routing."""
    from taskmllm.eval.suites import routing_summary

    call = SimpleNamespace(task="det", mask=None, boxes=np.zeros((0, 4)), scores=np.zeros(0))
    items = {t: shapes_items(t, N, SEED, WORLD) for t in ("exist", "caption", "seg")}
    answers = {"exist": [[call], [], [], []], "caption": [[call, call], [], [call], []], "seg": [[]] * N}
    per_task = {t: score_task(t, items[t], [SimpleNamespace(text="Yes.", calls=c) for c in answers[t]])
                for t in items}
    assert per_task["exist"]["false_call_rate"] == 0.25 and per_task["caption"]["false_call_rate"] == 0.5
    assert "false_call_rate" not in per_task["seg"]
    got = routing_summary(per_task, items)
    assert got["false_call_rate"] == pytest.approx(3 / 8) and got["n_no_call_questions"] == 8
    assert got["task_questions"] == 0.0 and got["n_task_questions"] == N  # the seg answers called nothing


def test_missing_calls_count_as_misses():
    items = {t: shapes_items(t, N, SEED, WORLD) for t in EXPERT_OF}
    silent = [SimpleNamespace(text="I cannot see.", calls=[])] * N
    seg = score_task("seg", items["seg"], silent)
    assert seg["routing"] == 0.0 and seg["ciou"] == 0.0 and seg["giou"] == 0.0
    assert score_task("rec", items["rec"], silent)["acc@0.5"] == 0.0
    assert score_task("det", items["det"], silent)["AP"] == 0.0
    track = score_task("track", items["track"], silent)
    assert track["success_auc"] == 0.0 and track["precision@20"] == 0.0
    # a call to the wrong expert is a routing error and still a miss
    wrong = [SimpleNamespace(text="", calls=[SimpleNamespace(task="det", mask=None, boxes=np.zeros((0, 4)),
                                                             scores=np.zeros(0))])] * N
    assert score_task("seg", items["seg"], wrong)["giou"] == 0.0
    temporal = score_task("temporal", shapes_items("temporal", N, SEED, WORLD), silent)
    assert temporal["r1@0.3"] == 0.0 and temporal["miou"] == 0.0


def test_temporal_parses_the_answer_interval():
    items = shapes_items("temporal", 2, SEED, WORLD)
    answers = [SimpleNamespace(text=items[0].reference, calls=[]),
               SimpleNamespace(text="From frame 9 to frame 3.", calls=[])]  # ends before it starts: IoU 0
    out = score_task("temporal", items, answers)
    assert out["r1@0.5"] == 0.5 and out["miou"] == 0.5 and out["routing"] == 1.0


def test_answer_all_batches_and_checks_lengths():
    seen = []

    def answer(batch):
        seen.append(len(batch))
        return [SimpleNamespace(text=p, calls=[]) for _, p in batch]

    out = answer_all(answer, [(None, str(i)) for i in range(7)], batch_size=3, progress=False)
    assert [r.text for r in out] == [str(i) for i in range(7)] and seen == [3, 3, 1]
    with pytest.raises(MetricInputError, match="returned 1 results for 3"):
        answer_all(lambda b: b[:1], [(None, "q")] * 3, batch_size=3, progress=False)


def test_always_yes_model_gets_pope_f1_two_thirds(tmp_path):
    asked = []

    def yes(batch):
        asked.extend(p for _, p in batch)
        return [SimpleNamespace(text="Yes, there is.", calls=[]) for _ in batch]

    options = EvalOptions(n=12, seed=SEED, world=WORLD, batch_size=8, progress=False)
    report = report_suite("pope-shapes", yes, tmp_path, options, meta={"model": "always-yes"})
    import json

    results = json.loads(report.json_path.read_text())
    pope = results["pope"]
    assert set(pope["splits"]) == {"random", "popular", "adversarial"}
    for split in pope["splits"].values():  # balanced splits: precision 0.5, recall 1 -> F1 = 2/3
        assert split["yes_ratio"] == 1.0 and split["recall"] == 1.0 and split["precision"] == 0.5
        assert split["f1"] == pytest.approx(2 / 3)
    assert pope["mean_f1"] * 100 == pytest.approx(66.67, abs=0.01)
    assert all(q.startswith("Is there a ") and "<image>" not in q for q in asked)  # the model places the image
    assert results["model"] == "always-yes" and "yes_ratio" in report.markdown_path.read_text()
    (plot,) = report.plot_paths
    with Image.open(plot) as im:
        assert plot.name == "pope_yes_ratio.png" and im.format == "PNG" and min(im.size) > 200


def test_chair_shapes_counts_hallucinations():
    def answer(batch):
        return [SimpleNamespace(text="A heart, a star and a circle.", calls=[]) for _ in batch]

    out = run_suite("chair-shapes", answer, EvalOptions(n=5, seed=SEED, world=WORLD, progress=False))
    metrics = out.results["chair"]
    items = shapes_items("caption", 5, SEED, WORLD)
    said = {"heart", "star", "circle"}
    expected_s = np.mean([bool(said - {o.category for o in it.sample.objects}) for it in items])
    expected_i = sum(len(said - {o.category for o in it.sample.objects}) for it in items) / (3 * 5)
    assert metrics["chair_s"] == pytest.approx(expected_s) and metrics["chair_i"] == pytest.approx(expected_i)
    gts = [{o.category for o in it.sample.objects} for it in items]
    assert metrics["recall"] == pytest.approx(sum(len(g & said) for g in gts) / sum(len(g) for g in gts))
    assert metrics["mean_length"] == 7 and metrics["routing"] == 1.0


def test_pipeline_answerer_keeps_every_detection_for_ap():
    """Evaluation ranks every detection slot (COCO AP / DETR protocol): the answerer asks for threshold 0."""
    from taskmllm.eval.suites import pipeline_answerer

    seen = {}

    def pipe(visuals, prompts, **kwargs):
        seen.update(kwargs)
        return ["r"] * len(prompts)

    assert pipeline_answerer(pipe, 12)([(None, "a"), (None, "b")]) == ["r", "r"]
    assert seen == {"max_new_tokens": 12, "intervention": None, "score_threshold": 0.0}


def test_shapes_suite_runs_the_tasks_asked(oracle):
    from taskmllm.errors import ConfigError

    options = EvalOptions(n=N, seed=SEED, world=WORLD, batch_size=8, progress=False, tasks=("exist", "track"))
    results = run_suite("shapes", oracle, options).results
    assert sorted(results["tasks"]) == ["exist", "track"] and sorted(results["heldout"]) == ["exist"]
    assert results["tasks"]["exist"]["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="'colour'"):
        EvalOptions(tasks=("exist", "colour"))
