"""Where the visual placeholder goes: ShapesWorld questions written without it (``question_first=None``) are
placed by the model's processor (``tokens.image_first``), token for token as the builder's own layouts; the
evaluation suites ask that way, so a model is trained and asked in one layout."""

from __future__ import annotations

import dataclasses

import pytest

from taskmllm.data.pope import CooccurrenceStats, pope_samples
from taskmllm.data.shapesworld import ShapesWorld, TaskSource, WorldConfig
from taskmllm.data.shapesworld.conversations import ConversationBuilder, ConversationConfig
from taskmllm.data.sources import parse_sources
from taskmllm.errors import ConfigError
from taskmllm.eval.suites import pope_shapes_samples, shapes_items
from taskmllm.training.aux import AuxContext, FocusLoss, FocusOptions
from tests.conftest import tiny_config

WORLD = ShapesWorld(WorldConfig(image_size=48, num_frames=4), seed=3)
TASKS = ("exist", "seg", "caption", "qa", "track")


def _samples(question_first, task: str, n: int = 4):
    src = TaskSource(WORLD, task, builder=ConversationBuilder(ConversationConfig(question_first=question_first)))
    return [src[i] for i in range(n)]


def _processor(tokenizer, image_first: bool, repeat_question: bool = False):
    from taskmllm.model.mllm import TaskMLLM

    cfg = tiny_config(tokenizer)
    cfg.tokens = dataclasses.replace(cfg.tokens, image_first=image_first, repeat_question=repeat_question)
    return TaskMLLM(cfg, tokenizer).processor


@pytest.mark.parametrize("task", TASKS)
def test_no_placeholder_when_the_model_places_it(task):
    for placed, free in zip(_samples(True, task), _samples(None, task)):
        assert "<image>" not in free.turns[0][0] and "<video>" not in free.turns[0][0]
        marker = "\n<video>" if placed.is_video else "\n<image>"
        assert placed.turns[0][0] == free.turns[0][0] + marker  # same question, same scene, same rng
        assert free.turns[1:] == placed.turns[1:]


@pytest.mark.parametrize("image_first", [False, True])
@pytest.mark.parametrize("task", TASKS)
def test_processor_places_it_as_the_builder_would(tokenizer, image_first, task):
    processor = _processor(tokenizer, image_first)
    for fixed, free in zip(_samples(not image_first, task), _samples(None, task)):
        frames = 4 if fixed.is_video else 1
        assert (processor.encode_turns(free.turns, frames, fixed.is_video)
                == processor.encode_turns(fixed.turns, frames, fixed.is_video))


def test_shapes_source_follows_the_model_by_default():
    specs = parse_sources({"a": {"kind": "shapesworld", "image_size": 48, "mix": {"exist": 1.0}},
                           "b": {"kind": "shapesworld", "image_size": 48, "mix": {"exist": 1.0},
                                 "question_first": False}})
    assert specs["a"].question_first is None and specs["b"].question_first is False
    assert "<image>" not in specs["a"].build(4, 0)[0].turns[0][0]
    assert specs["b"].build(4, 0)[0].turns[0][0].startswith("<image>\n")
    with pytest.raises(ConfigError, match="question_first"):
        parse_sources({"a": {"kind": "shapesworld", "question_first": "first"}})


def test_eval_questions_are_typed_as_a_user_types_them():
    for task in ("exist", "caption", "track"):
        for item in shapes_items(task, 3, seed=5, world=WorldConfig(image_size=48, num_frames=4)):
            assert "<image>" not in item.prompt and "<video>" not in item.prompt
    pope = pope_shapes_samples(n=4, seed=5, world=WorldConfig(image_size=48))
    assert all("<image>" not in s.turns[0][0] for split in pope.values() for s in split)


def test_pope_samples_layouts():
    scenes = [WORLD.image(i, "test") for i in range(4)]
    stats = CooccurrenceStats.from_samples(scenes, WORLD.config.shapes)
    free, after = (pope_samples(scenes, "random", stats, question_first=qf) for qf in (None, True))
    assert [s.turns[0][0] + "\n<image>" for s in free] == [s.turns[0][0] for s in after]


def test_focus_needs_the_question_before_the_image():
    context = AuxContext(hidden_size=8, vision_width=4, num_layers=2, image_first=True)
    with pytest.raises(ConfigError, match="image_first"):
        FocusLoss(FocusOptions(layer=1), context)
    FocusLoss(FocusOptions(layer=1), dataclasses.replace(context, image_first=False))  # builds


def test_a_fresh_model_takes_its_layout_from_the_stage():
    from taskmllm.training.config import TrainConfig
    from taskmllm.training.train import build_joint

    cfg = TrainConfig()
    cfg.model.llm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.model.image_first = True
    assert cfg.model.builder_args()["image_first"] is True
    mllm = build_joint(cfg).mllm
    assert mllm.config.tokens.image_first
    ids, _ = mllm.processor.encode("Is there a red circle?", 1, False)
    text = mllm.processor.tokenizer.decode(ids)
    assert text.index("<image>") < text.index("red circle")


@pytest.mark.parametrize("image_first", [False, True])
def test_repeated_question_on_both_sides_of_the_image(tokenizer, image_first):
    """``tokens.repeat_question``: the first question, the image, the question again (whatever ``image_first``);
    later turns and a prompt that holds its own placeholder are left as written; the same ids as the text
    written that way by hand."""
    processor = _processor(tokenizer, image_first, repeat_question=True)
    question, answer = "Is there a red circle?", "Yes."
    by_hand = f"{question}\n<image>\n{question}"
    assert processor.encode(question, 1, False) == processor.encode(by_hand, 1, False)
    turns = [(question, answer), ("What color is it?", "Red.")]
    assert processor.encode_turns(turns, 1, False) == processor.encode_turns([(by_hand, answer), turns[1]], 1, False)
    text = tokenizer.decode(processor.encode(question, 1, False)[0])
    assert text.count("red circle") == 2 and text.index("red circle") < text.index("<image>") < text.rindex("red")
    own = processor.encode(f"<image>\n{question}", 1, False)[0]
    assert tokenizer.decode(own).count("red circle") == 1
    frames = processor.encode(question, 4, True)[0]
    assert tokenizer.decode(frames).count("red circle") == 2


def test_focus_may_train_a_model_that_repeats_the_question():
    from taskmllm.training.config import TrainConfig
    from taskmllm.training.train import aux_context, build_joint

    cfg = TrainConfig()
    cfg.model.llm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.model.image_first, cfg.model.repeat_question = True, True
    joint = build_joint(cfg)
    assert joint.mllm.config.tokens.repeat_question
    context = aux_context(joint, parse_sources({"a": {"kind": "shapesworld", "image_size": 48}}))
    assert not context.image_first  # the visual tokens follow the question
    FocusLoss(FocusOptions(layer=1), context)  # builds
