"""Conversations: referring expressions resolve uniquely (independent checker), answers are true,
targets align with task tokens, CHAIR ground truth and the tokenizer corpus."""

from __future__ import annotations

import re

import numpy as np
import pytest

from taskmllm.data.chair import chair_counts, chair_ground_truth
from taskmllm.data.shapesworld.vocab import mentioned_objects
from taskmllm.data.shapesworld.conversations import ConversationBuilder, ConversationConfig, corpus
from taskmllm.data.shapesworld import TaskSource
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError
from taskmllm.model.tokens import decode_boxes, find_refs, task_token

SHAPES = {"circle", "square", "triangle", "star", "hexagon", "heart"}
COLORS = {"red", "green", "blue", "yellow", "purple", "orange", "cyan"}
SIZES = {"small", "medium", "large"}
WORLD = ShapesWorld(WorldConfig(image_size=96, num_frames=6), seed=11)


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def check_ref(phrase: str, objects, side: float, video: bool = False) -> list:
    """Independent reading of the documented grammar: the [POS] [SIZE] [COLOR] (SHAPE|object)."""
    words = phrase.split()
    assert words[0] == "the", phrase
    words = words[1:]
    pos = words.pop(0) if words[0] in {"leftmost", "rightmost", "topmost", "bottommost"} else None
    assert not (video and pos), "positional words are not used for moving objects"
    noun = words.pop()
    assert noun in SHAPES | {"object"}, phrase
    attrs = set(words)
    assert attrs <= SIZES | COLORS and len(attrs) == len(words), phrase
    keep = [o for o in objects if (noun == "object" or o.category == noun)
            and all(a in (o.size, o.color) for a in attrs)]
    if pos is None:
        return keep
    axis = 0 if pos in ("leftmost", "rightmost") else 1
    sign = 1 if pos in ("leftmost", "topmost") else -1
    if video:
        return []
    vals = sorted((sign * _centre(o.mask)[axis], k) for k, o in enumerate(keep))
    if len(vals) < 2 or vals[1][0] - vals[0][0] < 0.08 * side:
        return []
    return [keep[vals[0][1]]]


def test_referring_expressions_resolve_to_exactly_one_object():
    n = 0
    for task in ("seg", "rec", "color", "shape"):
        src = TaskSource(WORLD, task)
        for i in range(60):
            s = src[i]
            q, a = s.turns[0]
            if task in ("seg", "rec"):
                (phrase,) = find_refs(a)
                hits = check_ref(phrase, s.objects, s.hw[1])
                assert len(hits) == 1, (phrase, [o.name for o in s.objects])
                assert s.grounding.objects == (hits[0].id,)
                t = s.targets[0]
                if task == "seg":
                    assert np.array_equal(t.mask, hits[0].mask)
                h, w = s.hw
                assert np.allclose(t.boxes[0], np.array(hits[0].box) / [w, h, w, h], atol=1e-6)
            else:
                phrase = re.fullmatch(r"What (?:color|shape) is (.*)\?\n<image>", q).group(1)
                hits = check_ref(phrase, s.objects, s.hw[1])
                assert len(hits) == 1, phrase
                assert s.grounding.objects == (hits[0].id,)
                expected = hits[0].color.capitalize() + "." if task == "color" else f"A {hits[0].category}."
                assert a == expected
                assert (task == "color") != any(c in phrase.split() for c in COLORS) or task == "shape"
            n += 1
    assert n == 240


def test_video_referring_and_tracking_targets():
    for task in ("track", "track_box", "temporal"):
        src = TaskSource(WORLD, task)
        for i in range(15):
            s = src[i]
            q, a = s.turns[0]
            assert q.count("<video>") == 1 and "<image>" not in q
            if task == "temporal":
                phrase = re.fullmatch(r"(?:When is (.*) visible\?|In which frames does (.*) appear\?)\n<video>",
                                      q)
                phrase = phrase.group(1) or phrase.group(2)
                (obj,) = check_ref(phrase, s.objects, s.hw[1], video=True)
                vis = np.flatnonzero(obj.masks.reshape(len(obj.masks), -1).any(1))
                assert a == f"From frame {vis[0]} to frame {vis[-1]}."
                continue
            (phrase,) = find_refs(a)
            (t,) = s.targets
            assert t.task == "track" and t.boxes.shape == (s.num_frames, 4) and t.visible.shape == (s.num_frames,)
            if phrase != "the object":
                (obj,) = check_ref(phrase, s.objects, s.hw[1], video=True)
            else:
                obj = next(o for o in s.objects if np.array_equal(o.visible, t.visible))
            h, w = s.hw
            assert np.array_equal(t.visible, obj.masks.reshape(len(obj.masks), -1).any(1))
            for f in np.flatnonzero(t.visible):
                ys, xs = np.nonzero(obj.masks[f])
                assert np.allclose(t.boxes[f], [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
            if task == "track_box":
                assert t.prompt_box is not None and t.visible[0]
                (box,) = decode_boxes(q)
                assert np.allclose(box, t.prompt_box, atol=1 / 999 + 1e-6)
                assert np.allclose(t.prompt_box, t.boxes[0])


def test_answers_are_true():
    for task in ("count", "exist", "relation", "det"):
        src = TaskSource(WORLD, task)
        for i in range(50):
            s = src[i]
            q, a = s.turns[0]
            if task == "count":
                m = re.fullmatch(r"How many (\w+?)s are there\?\n<image>", q) or re.fullmatch(
                    r"How many (\w+) objects are there\?\n<image>", q)
                word = m.group(1)
                n = sum(word in (o.category, o.color) for o in s.objects)
                words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
                assert a == words[n].capitalize() + "."
                assert sorted(s.grounding.objects) == sorted(o.id for o in s.objects if word in (o.category, o.color))
            elif task == "exist":
                noun = re.fullmatch(r"Is there a (.+) in the image\?\n<image>", q).group(1).split()
                named = [o.id for o in s.objects if o.category == noun[-1] and (len(noun) == 1 or o.color == noun[0])]
                assert a == ("Yes." if named else "No.")
                assert sorted(s.grounding.objects) == sorted(named)  # () when the question names something absent
            elif task == "relation":
                m = re.fullmatch(r"Is (the .+?) (to the left of|to the right of|above|below) (the .+)\?\n<image>", q)
                (oa,), (ob,) = (check_ref(m.group(k), s.objects, s.hw[1]) for k in (1, 3))
                assert s.grounding.objects == (oa.id, ob.id)
                (ax, ay), (bx, by) = _centre(oa.mask), _centre(ob.mask)
                d = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[m.group(2)]
                assert abs(d) >= 0.08 * s.hw[1] and a == ("Yes." if d > 0 else "No.")
            else:
                (phrase,) = find_refs(a)
                words = phrase.split()
                hits = [o for o in s.objects if (words[-1] == "objects" or o.category + "s" == words[-1])
                        and (len(words) == 1 or o.color == words[0])]
                h, w = s.hw
                want = sorted(tuple(np.array(o.box) / [w, h, w, h]) for o in hits)
                got = sorted(tuple(b) for b in s.targets[0].boxes)
                assert sorted(s.grounding.objects) == sorted(o.id for o in hits)
                assert np.allclose(np.array(want).reshape(-1, 4), np.array(got).reshape(-1, 4), atol=1e-6)


def test_targets_align_with_task_tokens_and_question_order():
    for qf in (True, False):
        builder = ConversationBuilder(ConversationConfig(question_first=qf, boxes_in_answer=True))
        for task in ("caption", "seg", "rec", "det", "exist", "track", "track_box"):
            src = TaskSource(WORLD, task, builder=builder)
            for i in range(8):
                s = src[i]
                answers = " ".join(a for _, a in s.turns)
                tokens = re.findall("|".join(re.escape(task_token(t)) for t in ("seg", "det", "track")), answers)
                assert [t.task for t in s.targets] == [tok.strip("<>") for tok in tokens]
                assert "<query>" not in answers
                q = s.turns[0][0]
                ph = "<video>" if s.is_video else "<image>"
                assert q.count(ph) == 1 and (q.endswith(ph) if qf else q.startswith(ph))
                if task in ("rec", "det"):
                    assert len(decode_boxes(answers)) == len(s.targets[0].boxes)


def test_captions_have_no_hallucination_and_chair_counts():
    src = TaskSource(WORLD, "caption")
    samples = [src[i] for i in range(30)]
    caps = [s.turns[0][1] for s in samples]
    for cap, s in zip(caps, samples):
        assert set(mentioned_objects(cap)) == chair_ground_truth(s) == {o.category for o in s.objects}
    scores = chair_counts(caps, samples, mentioned_objects)
    assert scores["CHAIR_S"] == 0 and scores["CHAIR_I"] == 0 and scores["recall"] == 1
    absent = [sorted(SHAPES - chair_ground_truth(s))[0] for s in samples[:2]]
    bad = [f"A {absent[0]} and discs.", f"Two {absent[1]}s."]
    sc = chair_counts(bad, samples[:2], mentioned_objects)
    exp_i = (2 + (0 if "circle" in chair_ground_truth(samples[0]) else 1)) / 3  # 3 mentions
    assert sc["CHAIR_S"] == 1 and abs(sc["CHAIR_I"] - exp_i) < 1e-9


def test_corpus_covers_templates():
    texts = list(corpus(400, seed=0))
    assert len(texts) == 400 and texts == list(corpus(400, seed=0))
    blob = "\n".join(texts)
    for marker in ("<seg>", "<det>", "<track>", "<box>", "<ref>", "<image>", "<video>", "From frame",
                   "How many", "Is there", "What color", "What shape", "Describe", "Track", "to the left of"):
        assert marker in blob, marker


def test_qa_asks_distinct_questions_each_true_to_its_own_task():
    """``qa``: up to qa_turns distinct VQA questions about one image, the placeholder in the first only; each
    turn is exactly what its own task's builder writes for the same scene (same question -> same answer)."""
    builder = ConversationBuilder(ConversationConfig(qa_turns=5))
    singles = {}
    for task in ("exist", "color", "shape", "count", "relation"):
        for k in range(40):
            s = builder.build(WORLD.image(3), task, np.random.default_rng(k))
            if s is not None:
                singles[s.turns[0][0].replace("\n<image>", "")] = s.turns[0][1]
    lengths = []
    for i in range(30):
        s = builder.build(WORLD.image(i), "qa", np.random.default_rng(i))
        questions = [q.replace("\n<image>", "") for q, _ in s.turns]
        assert s.task == "qa" and s.targets == [] and len(set(questions)) == len(questions) <= 5
        assert s.turns[0][0].endswith("\n<image>") and all("<image>" not in q for q, _ in s.turns[1:])
        lengths.append(len(s.turns))
    assert max(lengths) == 5
    s = builder.build(WORLD.image(3), "qa", np.random.default_rng(0))
    first = builder.build(WORLD.image(3), "qa", np.random.default_rng(0))
    assert first.grounding is not None and set(first.grounding.objects) <= {o.id for o in first.objects}
    assert TaskSource(WORLD, "caption")[0].grounding is None  # a caption names nothing
    for q, a in s.turns:  # every qa turn on scene 3 agrees with the single-task answer to the same question
        q = q.replace("\n<image>", "")
        assert singles.get(q, a) == a
    assert builder.build(WORLD.video(0), "qa", np.random.default_rng(0)) is None
    with pytest.raises(ConfigError, match="qa_turns must be >= 1"):
        ConversationConfig(qa_turns=0)
