"""Ground truth -> conversations in the token protocol, with the expert targets of every task token.

Text conventions (all ShapesWorld texts follow them; the tokenizer corpus is :func:`corpus`):

- A question holds the visual placeholder once: ``"Segment the red circle.\\n<image>"`` with the question
  first (default, ``ConversationConfig.question_first``) or ``"<image>\\nSegment the red circle."``; videos use
  ``<video>``. With ``question_first=None`` it holds none: the model's processor puts it where the model was
  trained to see it (``tokens.image_first``), as the real-annotation builder (:mod:`taskmllm.data.grounded`) does.
- Answers carry task tokens **without** ``<query>`` placeholders (the processor inserts the K queries):
  ``"Sure, <ref>the red circle</ref><seg>."`` (referring segmentation), ``"<ref>the red circle</ref><det>."``
  (referring detection, one box), ``"<ref>triangles</ref><det>."`` (all triangles, possibly none),
  ``"<ref>the blue square</ref><track>."`` (tracking, also from a ``<box>`` in the prompt).
  With ``boxes_in_answer=True`` detection answers also write the boxes back after the task token:
  ``"<ref>triangles</ref><det> <box>..</box><box>..</box>."`` (sorted by x1, then y1).
- ``Sample.targets[i]`` is the :class:`TaskTarget` of the i-th task token in the answers. Boxes in targets
  are normalized 0-1 ``x1, y1, x2, y2``; masks are bool at the sample's resolution; tracking boxes are
  ``(T, 4)`` with ``visible (T,)``; a prompt box is the target's box in frame 0.
- ``Sample.grounding`` holds the first question and the ids of the objects it names (every object that matches an
  exist, count or detection noun; the referred object(s) of the others; ``()`` when it names something absent;
  None for captions). Training can teach the visual tokens, which come after the question, where to look.
- Yes/no answers are ``"Yes."`` / ``"No."``; counts are number words (``"Two."``); colors ``"Red."``;
  shapes ``"A circle."``; frame intervals are 0-based digits: ``"From frame 2 to frame 6."``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from taskmllm.data.pope import pope_question
from taskmllm.data.sample import Grounding, Sample
from taskmllm.data.shapesworld.referring import RELATIONS, expressions, relation_holds
from taskmllm.data.shapesworld.vocab import SHAPES, number_word, plural
from taskmllm.data.shapesworld.world import Shape, ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError, UnknownTaskError
from taskmllm.experts.base import TaskTarget
from taskmllm.model.tokens import REF_CLOSE, REF_OPEN, encode_box, place_visual, task_token

IMAGE_TASKS: tuple[str, ...] = ("caption", "exist", "color", "shape", "count", "relation", "seg", "rec", "det")
VIDEO_TASKS: tuple[str, ...] = ("track", "track_box", "temporal")
#: Multi-turn image tasks: ``qa`` asks ``ConversationConfig.qa_turns`` different questions of :data:`QA_TASKS`
#: about one image (LLaVA-style multi-turn; every answer is supervised, so one forward trains several answers).
DIALOG_TASKS: tuple[str, ...] = ("qa",)
QA_TASKS: tuple[str, ...] = ("exist", "color", "shape", "count", "relation")

Q_CAPTION = ("Describe the image.", "What is in the image?", "Write a short caption.")
Q_SEG = ("Segment {}.", "Please segment {}.", "Can you segment {}?")
Q_REC = ("Where is {}?", "Find {}.", "Locate {}.")
Q_DET = ("Find all {}.", "Detect all {}.", "Where are all {}?")
Q_TRACK = ("Track {}.", "Follow {} through the video.")
Q_TRACK_BOX = ("Track the object in {} of the first frame.", "Follow the object at {} in the first frame.")
Q_TEMPORAL = ("When is {} visible?", "In which frames does {} appear?")


@dataclass(frozen=True)
class ConversationConfig:
    """Text options.

    Attributes:
        question_first: put the question text before the ``<image>`` / ``<video>`` placeholder (True) or after it
            (False); None: write no placeholder (the processor places it by the model's ``tokens.image_first``).
        boxes_in_answer: write detection boxes as ``<box>`` text after the ``<det>`` token.
        positional: allow leftmost/rightmost/... in image referring expressions.
        qa_turns: questions per ``qa`` conversation (fewer when the scene supports fewer distinct ones).
    """

    question_first: Optional[bool] = True
    boxes_in_answer: bool = False
    positional: bool = True
    qa_turns: int = 4

    def __post_init__(self) -> None:
        if self.qa_turns < 1:
            raise ConfigError(f"ConversationConfig.qa_turns must be >= 1, got {self.qa_turns}")


class NoQuestion(Exception):
    """Internal: this scene cannot support the asked task (e.g. no object has a unique expression)."""


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _ids(objects) -> tuple[int, ...]:
    """The ids of ``objects`` (a question's focus)."""
    return tuple(o.id for o in objects)


def _norm(box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return (np.asarray(box, np.float64) / np.array([w, h, w, h])).astype(np.float32)


def _grounding(turns: list[tuple[str, str]], focus: Optional[tuple[int, ...]]) -> Optional[Grounding]:
    """The first question's grounding: its text and the ids of the objects it names (None: it names nothing)."""
    return None if focus is None else Grounding(turns[0][0], focus)


def _ref(phrase: str) -> str:
    return f"{REF_OPEN}{phrase}{REF_CLOSE}"


class ConversationBuilder:
    """Writes one conversation of a given task about a scene sample (``Sample.task == "scene"``)."""

    def __init__(self, config: Optional[ConversationConfig] = None) -> None:
        self.config = config or ConversationConfig()
        self._tasks: dict[str, Callable] = {t: getattr(self, f"_{t}") for t in IMAGE_TASKS + VIDEO_TASKS}

    def question(self, text: str, video: bool = False) -> str:
        """Place the visual placeholder around the question text (none with ``question_first=None``)."""
        if self.config.question_first is None:
            return text
        return place_visual(text, video, image_first=not self.config.question_first)

    def build(self, scene: Sample, task: str, rng: np.random.Generator) -> Optional[Sample]:
        """A sample of ``task`` about ``scene``; ``None`` when the scene cannot support the task.

        Raises:
            UnknownTaskError: ``task`` is not one of :data:`IMAGE_TASKS`, :data:`VIDEO_TASKS`, :data:`DIALOG_TASKS`.
        """
        if task not in self._tasks and task not in DIALOG_TASKS:
            raise UnknownTaskError(f"unknown conversation task {task!r}; "
                                   f"known: {IMAGE_TASKS + VIDEO_TASKS + DIALOG_TASKS}")
        if (task in VIDEO_TASKS) != scene.is_video or not scene.objects:
            return None
        if task == "qa":
            turns, focus = self._qa_turns(scene, rng)
            return scene.with_turns(task, turns, [], task, _grounding(turns, focus)) if turns else None
        try:
            question, answer, targets, focus = self._tasks[task](scene, rng)
        except NoQuestion:
            return None
        turns = [(self.question(question, scene.is_video), answer)]
        return scene.with_turns(task, turns, targets, task, _grounding(turns, focus))

    # ------------------------------------------------------------------------------------- helpers
    def _unique(self, scene: Sample, rng, omit=(), candidates=None) -> tuple[Shape, str]:
        """A random object with a random expression naming only it."""
        objs = list(candidates if candidates is not None else scene.objects)
        side = scene.hw[1]
        for k in rng.permutation(len(objs)):
            exprs = expressions(scene.objects, objs[k], side, self.config.positional and not scene.is_video,
                                omit)
            if exprs:
                return objs[k], _pick(rng, exprs)
        raise NoQuestion

    def _qa_turns(self, scene: Sample, rng) -> tuple[list[tuple[str, str]], Optional[tuple[int, ...]]]:
        """Up to ``qa_turns`` distinct questions of random :data:`QA_TASKS`; the first holds the placeholder.
        Also returns the first question's focus (the only one the visual tokens come after)."""
        turns: list[tuple[str, str]] = []
        asked: set[str] = set()
        focus: Optional[tuple[int, ...]] = None
        for _ in range(3 * self.config.qa_turns):
            if len(turns) == self.config.qa_turns:
                break
            try:
                question, answer, _, named = self._tasks[_pick(rng, QA_TASKS)](scene, rng)
            except NoQuestion:
                continue
            if question not in asked:
                asked.add(question)
                if not turns:
                    focus = named
                turns.append((self.question(question) if len(turns) == 0 else question, answer))
        return turns, focus

    # --------------------------------------------------------------------------------- image tasks
    def _caption(self, scene: Sample, rng):
        groups: dict[tuple[str, str], list[Shape]] = {}
        for o in sorted(scene.objects, key=lambda o: o.box[0]):
            groups.setdefault((o.color, o.category), []).append(o)
        items = []
        for (color, shape), objs in groups.items():
            if len(objs) == 1:
                items.append(f"{'an' if objs[0].size[0] in 'aeiou' else 'a'} {objs[0].size} {color} {shape}")
            else:
                items.append(f"{number_word(len(objs))} {color} {plural(shape)}")
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        bg = scene.meta.get("background", "plain")
        text = f"{listed} on a {bg} background."
        return _pick(rng, Q_CAPTION), text[0].upper() + text[1:], [], None

    def _exist(self, scene: Sample, rng):
        shapes = self._shape_vocab(scene)
        present = sorted({o.category for o in scene.objects})
        yes = bool(rng.random() < 0.5)
        if rng.random() < 0.5:  # "a red circle" (a present shape in another color makes a hard negative)
            pairs = {(o.color, o.category) for o in scene.objects}
            if yes:
                color, shape = sorted(pairs)[int(rng.integers(len(pairs)))]
            else:
                colors = scene.meta.get("colors") or sorted({o.color for o in scene.objects})
                banned = pairs | {tuple(p) for p in scene.meta.get("unseen", ())}  # never name held-out pairs
                options = [(c, s) for c in colors for s in shapes if (c, s) not in banned]
                if not options:
                    raise NoQuestion
                color, shape = _pick(rng, options)
            noun = f"{color} {shape}"
            named = _ids(o for o in scene.objects if o.color == color and o.category == shape)
        else:
            absent = [s for s in shapes if s not in present]
            if not yes and not absent:
                yes = True
            noun = _pick(rng, present if yes else absent)
            named = _ids(o for o in scene.objects if o.category == noun)
        return f"Is there a {noun} in the image?", "Yes." if yes else "No.", [], named

    def _color(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng, omit=("color",))
        return f"What color is {phrase}?", f"{obj.color.capitalize()}.", [], (obj.id,)

    def _shape(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng, omit=("shape",))
        return f"What shape is {phrase}?", f"A {obj.category}.", [], (obj.id,)

    def _count(self, scene: Sample, rng):
        if rng.random() < 0.7:
            shape = _pick(rng, self._shape_vocab(scene))
            named = _ids(o for o in scene.objects if o.category == shape)
            noun = plural(shape)
        else:
            color = _pick(rng, sorted({o.color for o in scene.objects}))
            named = _ids(o for o in scene.objects if o.color == color)
            noun = f"{color} objects"
        return f"How many {noun} are there?", f"{number_word(len(named)).capitalize()}.", [], named

    def _relation(self, scene: Sample, rng):
        side = scene.hw[1]
        named = [(o, e) for o in scene.objects for e in expressions(scene.objects, o, side, False)[:2]]
        order = rng.permutation(len(named) * len(named) * len(RELATIONS)) if named else []
        rels = list(RELATIONS)
        for k in order:
            i, rest = divmod(int(k), len(named) * len(rels))
            j, r = divmod(rest, len(rels))
            (a, ea), (b, eb) = named[i], named[j]
            if a is b:
                continue
            holds = relation_holds(a, b, rels[r], side)
            if holds is not None:
                return f"Is {ea} {rels[r]} {eb}?", "Yes." if holds else "No.", [], (a.id, b.id)
        raise NoQuestion

    def _seg(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng)
        target = TaskTarget("seg", phrase, mask=obj.mask, boxes=_norm(obj.box, scene.hw)[None])
        return _pick(rng, Q_SEG).format(phrase), f"Sure, {_ref(phrase)}{task_token('seg')}.", [target], (obj.id,)

    def _rec(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng)
        boxes = _norm(obj.box, scene.hw)[None]
        return _pick(rng, Q_REC).format(phrase), self._det_answer(phrase, boxes), [
            TaskTarget("det", phrase, boxes=boxes)], (obj.id,)

    def _det(self, scene: Sample, rng):
        colors = sorted({o.color for o in scene.objects})
        kind = rng.random()
        if kind < 0.6:
            shape = _pick(rng, self._shape_vocab(scene)) if rng.random() < 0.15 else _pick(
                rng, sorted({o.category for o in scene.objects}))
            phrase, hits = plural(shape), [o for o in scene.objects if o.category == shape]
        elif kind < 0.85:
            o = _pick(rng, scene.objects)
            phrase = f"{o.color} {plural(o.category)}"
            hits = [x for x in scene.objects if x.color == o.color and x.category == o.category]
        else:
            color = _pick(rng, colors)
            phrase, hits = f"{color} objects", [o for o in scene.objects if o.color == color]
        hits.sort(key=lambda o: (o.box[0], o.box[1]))
        boxes = np.stack([_norm(o.box, scene.hw) for o in hits]) if hits else np.zeros((0, 4), np.float32)
        return _pick(rng, Q_DET).format(phrase), self._det_answer(phrase, boxes), [
            TaskTarget("det", phrase, boxes=boxes)], _ids(hits)

    def _det_answer(self, phrase: str, boxes: np.ndarray) -> str:
        text = f"{_ref(phrase)}{task_token('det')}"
        if self.config.boxes_in_answer and len(boxes):
            text += " " + "".join(encode_box(b) for b in boxes)
        return text + "."

    @staticmethod
    def _shape_vocab(scene: Sample) -> list[str]:
        return list(scene.meta.get("shapes") or SHAPES)

    # --------------------------------------------------------------------------------- video tasks
    def _track_target(self, scene: Sample, obj: Shape, phrase: str, prompt_box=None) -> TaskTarget:
        boxes = _norm(obj.boxes, scene.hw)
        return TaskTarget("track", phrase, boxes=boxes, visible=obj.visible.copy(), prompt_box=prompt_box)

    def _track(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng)
        answer = f"{_ref(phrase)}{task_token('track')}."
        return _pick(rng, Q_TRACK).format(phrase), answer, [self._track_target(scene, obj, phrase)], (obj.id,)

    def _track_box(self, scene: Sample, rng):
        first = [o for o in scene.objects if o.visible[0]]
        if not first:
            raise NoQuestion
        obj = _pick(rng, first)
        exprs = expressions(scene.objects, obj, scene.hw[1], positional=False)
        phrase = _pick(rng, exprs) if exprs else "the object"
        prompt_box = _norm(obj.boxes[0], scene.hw)
        question = _pick(rng, Q_TRACK_BOX).format(encode_box(prompt_box))
        answer = f"{_ref(phrase)}{task_token('track')}."
        return question, answer, [self._track_target(scene, obj, phrase, prompt_box)], (obj.id,)

    def _temporal(self, scene: Sample, rng):
        obj, phrase = self._unique(scene, rng)
        first, last = obj.interval
        return _pick(rng, Q_TEMPORAL).format(phrase), f"From frame {first} to frame {last}.", [], (obj.id,)


def corpus(n: int, seed: int = 0) -> Iterator[str]:
    """``n`` texts (questions and answers, alternating) covering every template, for tokenizer training.

    Includes POPE questions and detection answers with ``<box>`` text; built from small 64 px scenes.
    """
    world = ShapesWorld(WorldConfig(image_size=64, num_frames=4, backgrounds=("plain",), use_photos=False),
                        seed=seed)
    builders = [ConversationBuilder(ConversationConfig(question_first=qf, boxes_in_answer=bx))
                for qf in (True, False) for bx in (False, True)]
    tasks = IMAGE_TASKS + VIDEO_TASKS + ("pope",)
    rng = np.random.default_rng([seed, 7])
    count, i = 0, 0
    while count < n:
        task = tasks[i % len(tasks)]
        builder = builders[(i // len(tasks)) % len(builders)]
        if task == "pope":
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            texts = [builder.question(pope_question(shape)), _pick(rng, ("Yes.", "No."))]
        else:
            scene = world.video(i) if task in VIDEO_TASKS else world.image(i)
            sample = builder.build(scene, task, rng)
            texts = [t for turn in sample.turns for t in turn] if sample is not None else []
        for text in texts:
            if count >= n:
                return
            yield text
            count += 1
        i += 1
