"""Conversations in the token protocol about real annotations (RefCOCO refs, COCO instances, MOT tracks).

The generic counterpart of ShapesWorld's builder: it knows objects only through :class:`~taskmllm.data.sample.ObjectGT`
(category, labels, mask, box, per-frame boxes and visibility) and takes every word from the paraphrase
templates (:mod:`taskmllm.data.templates`, data). A task's scene and what it writes:

============  =====================  =====================================================================
task          scene                  conversation, target, grounding
============  =====================  =====================================================================
``seg``       a ref (``load_refs``)  one of its sentences -> ``<seg>``: the object's mask (and box)
``rec``       a ref                  one of its sentences -> ``<det>``: the object's box
``det``       an image (COCO)        "find every <category>" -> ``<det>``: every instance of it (see below;
                                     a share ``absent`` names a category missing from the image: no box)
``exist``     an image               "is there a <category>" -> yes / no (half the questions name a missing one)
``count``     an image               "how many <plural>" -> the number of instances, as a word (``absent``: 0)
``track``     a video clip (MOT)     "track the <category>" -> ``<track>``: per-frame boxes and visibility;
                                     only for a category unique in the clip
``track_box`` a video clip           a first-frame ``<box>`` prompt -> ``<track>`` of that object
``temporal``  a video clip           "when is the <category> visible" -> "From frame a to frame b."
                                     (a category unique in the clip)
``temporal_box``  a video clip       the same about the object in a ``<box>`` of its first visible frame
============  =====================  =====================================================================

**More instances than detection queries** (``max_instances``, set it to the ``<det>`` expert's query count):
the answer and the target keep the ``max_instances`` largest instances (by mask area, else box area; ties by
object id), so the set a ``<det>`` call is trained to predict always fits its queries; the question's grounding
still names every instance. Deterministic: the same scene always keeps the same instances.

Category phrases may be qualified by an attribute of the objects (``attributes: [color]`` -> "red circle" names
the red circles only; a share ``qualified`` of det / exist / count questions). Questions carry no visual
placeholder: the model's processor puts ``<image>`` / ``<video>`` where the model was trained to see it
(``tokens.image_first``). Targets hold boxes normalized to 0-1; ``Sample.grounding`` names the objects the
question names (region-phrase alignment works on real data as on ShapesWorld). With ``rng=None`` a builder
asks the first template deterministically (what the evaluation suites ask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from taskmllm.data.sample import Grounding, ObjectGT, Sample
from taskmllm.data.templates import Templates, fill, pick
from taskmllm.errors import ConfigError
from taskmllm.experts.base import TaskTarget
from taskmllm.model.tokens import REF_CLOSE, REF_OPEN, encode_box, task_token

REF_TASKS: tuple[str, ...] = ("seg", "rec")
IMAGE_TASKS: tuple[str, ...] = ("det", "exist", "count")
VIDEO_TASKS: tuple[str, ...] = ("track", "track_box", "temporal", "temporal_box")
#: task -> the expert its answer calls (None: a text answer)
EXPERT_OF: dict[str, Optional[str]] = {"seg": "seg", "rec": "det", "det": "det", "track": "track",
                                       "track_box": "track", "exist": None, "count": None, "temporal": None,
                                       "temporal_box": None}
Rng = Optional[np.random.Generator]


@dataclass(frozen=True)
class GroundedOptions:
    """How the conversations are written.

    Attributes:
        max_instances: the most boxes a detection target holds (the ``<det>`` expert's queries; see module doc).
        absent: share of det / exist / count questions about a category absent from the image.
        attributes: object labels that may qualify a category phrase (``["color"]``: "red circles").
        qualified: share of det / exist / count questions whose phrase is qualified (when ``attributes``).
        boxes_in_answer: UnifiedMLLM-style answers: det / rec answers also write the boxes as ``<box>`` text.
    """

    max_instances: int = 8
    absent: float = 0.15
    attributes: tuple[str, ...] = ()
    qualified: float = 0.3
    boxes_in_answer: bool = False

    def __post_init__(self) -> None:
        if self.max_instances < 1:
            raise ConfigError(f"max_instances must be >= 1, got {self.max_instances}")
        for name in ("absent", "qualified"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Phrase:
    """A category phrase: the category, an optional ``(label kind, value)`` qualifier, and its words."""

    category: str
    qualifier: Optional[tuple[str, str]]
    singular: str
    plural: str

    def names(self, obj: ObjectGT) -> bool:
        """Whether ``obj`` is one of the objects the phrase names."""
        return obj.category == self.category and (self.qualifier is None or
                                                  obj.label(self.qualifier[0]) == self.qualifier[1])


def keep_largest(objects: Sequence[ObjectGT], k: int) -> list[ObjectGT]:
    """The ``k`` largest of ``objects`` (mask area, else box area; ties by id), in their given order."""
    def area(o: ObjectGT) -> float:
        if o.area is not None:
            return float(o.area)
        if o.mask is not None:
            return float(np.asarray(o.mask).sum())
        x1, y1, x2, y2 = (float(v) for v in o.box)
        return (x2 - x1) * (y2 - y1)

    keep = {id(o) for o in sorted(objects, key=lambda o: (-area(o), o.id))[:k]}
    return [o for o in objects if id(o) in keep]


class GroundedBuilder:
    """Writes one conversation of a task about a scene of real annotations (see the module doc)."""

    def __init__(self, templates: Templates, options: GroundedOptions = GroundedOptions()) -> None:
        self.t, self.options = templates, options
        self._tasks: dict[str, Callable] = {t: getattr(self, f"_{t}") for t in EXPERT_OF}

    # ------------------------------------------------------------------------------------- public
    def supports(self, scene: Sample, task: str) -> bool:
        """Whether ``scene`` can give a ``task`` question (cheap: reads the objects, never the pixels)."""
        if task in REF_TASKS:
            return "ann_id" in scene.meta
        if task in IMAGE_TASKS:
            return not scene.is_video and bool(scene.objects or scene.meta.get("categories"))
        if task in ("track", "temporal"):
            return scene.is_video and bool(self._unique(scene))
        if task == "track_box":
            return scene.is_video and any(bool(o.visible[0]) for o in scene.objects)
        if task == "temporal_box":
            return scene.is_video and bool(scene.objects)
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(EXPERT_OF)}")

    def build(self, scene: Sample, task: str, rng: Rng = None) -> Sample:
        """A sample of ``task`` about ``scene`` (which :meth:`supports` it); ``rng=None`` asks deterministically."""
        if not self.supports(scene, task):
            raise ConfigError(f"{scene.id}: cannot ask a {task!r} question about this scene")
        return self._tasks[task](scene, rng)

    def refer(self, scene: Sample, task: str, phrase: str, rng: Rng = None) -> Sample:
        """``seg`` / ``rec`` about a ref scene's object named by ``phrase`` (one of its sentences)."""
        obj = next(o for o in scene.objects if o.id == scene.meta["ann_id"])
        box = self._norm(obj.box, scene)[None]
        question = fill(pick(rng, self.t.task(task).questions), phrase=phrase)
        if task == "seg":
            target = TaskTarget("seg", phrase, mask=obj.mask_array(), boxes=box)
        else:
            target = TaskTarget("det", phrase, boxes=box)
        grounded = self._grounded(task, {"phrase": phrase}, box if task == "rec" else None)
        answer = fill(pick(rng, self.t.task(task).answers), grounded=grounded)
        return self._sample(scene, task, question, answer, [target], (obj.id,))

    def detect(self, scene: Sample, phrase: Phrase, rng: Rng = None) -> Sample:
        """``det`` of every object ``phrase`` names (at most ``max_instances``, the largest; see module doc)."""
        hits = [o for o in scene.objects if phrase.names(o)]
        kept = sorted(keep_largest(hits, self.options.max_instances), key=lambda o: (o.box[0], o.box[1]))
        boxes = np.stack([self._norm(o.box, scene) for o in kept]) if kept else np.zeros((0, 4), np.float32)
        words = {"category": phrase.singular, "plural": phrase.plural}
        question = fill(pick(rng, self.t.det.questions), **words)
        answer = fill(pick(rng, self.t.det.answers), grounded=self._grounded("det", words, boxes))
        target = TaskTarget("det", self._ref("det", words), boxes=boxes)
        return self._sample(scene, "det", question, answer, [target], tuple(o.id for o in hits))

    def track_from_box(self, scene: Sample, obj: ObjectGT, rng: Rng = None) -> Sample:
        """``track_box``: the object ``obj`` (visible in frame 0) from its first-frame box."""
        prompt = self._norm(obj.boxes[0], scene)
        question = fill(pick(rng, self.t.track_box.questions), box=encode_box(prompt), category=obj.category)
        return self._track_sample(scene, obj, "track_box", question, rng, prompt)

    def phrase(self, category: str, qualifier: Optional[tuple[str, str]] = None) -> Phrase:
        """The :class:`Phrase` of ``category`` (qualified: "red circle")."""
        singular = f"{qualifier[1]} {category}" if qualifier else category
        return Phrase(category, qualifier, singular, self.t.plural(singular))

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _norm(box, scene: Sample) -> np.ndarray:
        h, w = scene.hw
        return (np.asarray(box, np.float64) / np.array([w, h, w, h])).astype(np.float32)

    def _ref(self, task: str, words: dict) -> str:
        return self.t.task(task).ref.format(**words)

    def _grounded(self, task: str, words: dict, boxes: Optional[np.ndarray] = None) -> str:
        text = f"{REF_OPEN}{self._ref(task, words)}{REF_CLOSE}{task_token(EXPERT_OF[task])}"
        if self.options.boxes_in_answer and boxes is not None and len(boxes):
            text += " " + "".join(encode_box(b) for b in boxes)
        return text

    @staticmethod
    def _sample(scene: Sample, task: str, question: str, answer: str, targets: list,
                focus: tuple[int, ...]) -> Sample:
        return scene.with_turns(task, [(question, answer)], targets, task, Grounding(question, focus))

    def _unique(self, scene: Sample) -> list[ObjectGT]:
        """Objects whose category no other object of the scene has (a category phrase names them)."""
        counts: dict[str, int] = {}
        for o in scene.objects:
            counts[o.category] = counts.get(o.category, 0) + 1
        return [o for o in scene.objects if counts[o.category] == 1]

    def _category_phrase(self, scene: Sample, rng: Rng, absent_share: float) -> Phrase:
        """A random category phrase: an absent category (share ``absent_share``), else a present one, qualified by
        an attribute of one of its objects (share ``qualified``). Without ``rng``: the first present category."""
        present = sorted({o.category for o in scene.objects})
        absent = [c for c in scene.meta.get("categories", ()) if c not in present]
        if rng is None:
            return self.phrase(present[0] if present else absent[0])
        if absent and (not present or rng.random() < absent_share):
            return self.phrase(pick(rng, absent))
        category = pick(rng, present)
        values = sorted({(kind, str(o.label(kind))) for o in scene.objects if o.category == category
                         for kind in self.options.attributes if o.label(kind)})
        if values and rng.random() < self.options.qualified:
            return self.phrase(category, values[int(rng.integers(len(values)))])
        return self.phrase(category)

    # ------------------------------------------------------------------------------------- tasks
    def _seg(self, scene: Sample, rng: Rng) -> Sample:
        return self.refer(scene, "seg", pick(rng, scene.meta["sentences"]), rng)

    def _rec(self, scene: Sample, rng: Rng) -> Sample:
        return self.refer(scene, "rec", pick(rng, scene.meta["sentences"]), rng)

    def _det(self, scene: Sample, rng: Rng) -> Sample:
        return self.detect(scene, self._category_phrase(scene, rng, self.options.absent), rng)

    def _exist(self, scene: Sample, rng: Rng) -> Sample:
        phrase = self._category_phrase(scene, rng, 0.5)  # yes and no equally often
        hits = tuple(o.id for o in scene.objects if phrase.names(o))
        question = fill(pick(rng, self.t.exist.questions), category=phrase.singular, plural=phrase.plural)
        answer = pick(rng, self.t.exist.yes_answers if hits else self.t.exist.no_answers)
        return self._sample(scene, "exist", question, answer, [], hits)

    def _count(self, scene: Sample, rng: Rng) -> Sample:
        phrase = self._category_phrase(scene, rng, self.options.absent)
        hits = tuple(o.id for o in scene.objects if phrase.names(o))
        question = fill(pick(rng, self.t.count.questions), category=phrase.singular, plural=phrase.plural)
        answer = fill(pick(rng, self.t.count.answers), count=len(hits), count_word=self.t.number(len(hits)))
        return self._sample(scene, "count", question, answer, [], hits)

    def _track_sample(self, scene: Sample, obj: ObjectGT, task: str, question: str, rng: Rng,
                      prompt: Optional[np.ndarray] = None) -> Sample:
        words = {"category": obj.category, "plural": self.t.plural(obj.category)}
        answer = fill(pick(rng, self.t.task(task).answers), grounded=self._grounded(task, words))
        target = TaskTarget("track", self._ref(task, words), boxes=self._norm(obj.boxes, scene),
                            visible=np.asarray(obj.visible, bool).copy(), prompt_box=prompt)
        return self._sample(scene, task, question, answer, [target], (obj.id,))

    def _track(self, scene: Sample, rng: Rng) -> Sample:
        obj = self._pick_object(self._unique(scene), rng)
        question = fill(pick(rng, self.t.track.questions), category=obj.category, plural=self.t.plural(obj.category))
        return self._track_sample(scene, obj, "track", question, rng)

    def _track_box(self, scene: Sample, rng: Rng) -> Sample:
        return self.track_from_box(scene, self._pick_object([o for o in scene.objects if o.visible[0]], rng), rng)

    def _temporal(self, scene: Sample, rng: Rng) -> Sample:
        obj = self._pick_object(self._unique(scene), rng)
        question = fill(pick(rng, self.t.temporal.questions), category=obj.category,
                        plural=self.t.plural(obj.category))
        return self._interval_sample(scene, obj, "temporal", question, rng)

    def _temporal_box(self, scene: Sample, rng: Rng) -> Sample:
        obj = self._pick_object(list(scene.objects), rng)
        first = obj.interval[0]
        question = fill(pick(rng, self.t.temporal_box.questions), frame=first,
                        box=encode_box(self._norm(obj.boxes[first], scene)))
        return self._interval_sample(scene, obj, "temporal_box", question, rng)

    def _interval_sample(self, scene: Sample, obj: ObjectGT, task: str, question: str, rng: Rng) -> Sample:
        first, last = obj.interval
        answer = fill(pick(rng, self.t.task(task).answers), first=first, last=last)
        return self._sample(scene, task, question, answer, [], (obj.id,))

    @staticmethod
    def _pick_object(objects: Sequence[ObjectGT], rng: Rng) -> ObjectGT:
        return objects[0] if rng is None else objects[int(rng.integers(len(objects)))]
