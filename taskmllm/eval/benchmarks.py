"""Named evaluation suites over a :class:`~taskmllm.router.pipeline.Pipeline`, with a JSON + markdown + PNG report.

    taskmllm eval --model DIR --suite shapes --n 200 --out runs/eval

=================  ===================================================================================
suite              what it runs
=================  ===================================================================================
``shapes``         every ShapesWorld task (``n`` questions each) on a fresh test world + held-out compositions
``pope-shapes``    POPE random / popular / adversarial on ``n`` ShapesWorld test images
``chair-shapes``   CHAIR of captions of ``n`` ShapesWorld test images
``pope``           POPE question files of the POPE repository (``--pope-questions``, ``--images``)
``chair``          CHAIR on COCO (``--instances``, ``--captions``, ``--images``)
``refcoco``        referring segmentation (cIoU, gIoU) and REC (Acc@0.5) on RefCOCO-style refs (``--data``
                   refs, ``--instances``, ``--image-root``, ``--split``)
``coco``           box AP (mask AP with masks) on COCO instances (``--data``, ``--image-root``)
``mot``            tracking success AUC / precision per sequence on MOT sequences (``--data``, ``--clip-len``)
=================  ===================================================================================

The last three: :mod:`taskmllm.eval.grounded_suites`.

Library use: :func:`run_suite` takes any answer function (see :mod:`taskmllm.eval.suites`), so a stub or
another model can be evaluated without a Pipeline; :func:`evaluate` loads a checkpoint, runs a suite and
writes the report. Interventions (``"vhr"``, ``"var"``, ``"zerotuning"``) run with the model's calibrated settings
(``interventions.json``, ``taskmllm calibrate``) when it carries them, else each method's defaults; VAR's default
``tau = min(20, 0.5 * sqrt(hidden_size))`` — VAR's published tau=20 is unreachable on models with
``sqrt(hidden_size) <= 20`` (the massive-activation ratio phi is at most sqrt(hidden_size)); pass ``tau`` to set it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Optional, Union

from taskmllm.data.shapesworld import WorldConfig
from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.eval.grounded_suites import run_coco, run_mot, run_refcoco
from taskmllm.eval.realdata import run_chair, run_pope
from taskmllm.eval.report import Report, write_report
from taskmllm.eval.suites import (DEFAULT_EVAL_SEED, HELDOUT_TASKS, SHAPES_TASKS, Answerer, SuiteOutput,
                                  pipeline_answerer, run_chair_shapes, run_pope_shapes, run_shapes)
from taskmllm.predict import INTERVENTIONS, make_intervention  # one constructor for the CLI, eval and demo

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["INTERVENTIONS", "SUITES", "EvalOptions", "Suite", "evaluate", "make_intervention", "report_suite",
           "run_suite"]


@dataclass(frozen=True)
class EvalOptions:
    """Options of a suite run (each suite reads the ones it needs).

    Attributes:
        n: questions per task (``shapes``), images (``pope-shapes``, ``chair-shapes``, ``chair``), questions
            per file (``pope``); ``None`` = the suite's default (200 for ShapesWorld suites, all for real data).
        seed: seed of the evaluation world (ShapesWorld) or of the CHAIR image sample.
        world: ShapesWorld scene parameters (default ``WorldConfig()``).
        batch_size: questions per model call.
        progress: show tqdm progress bars.
        pope_questions: POPE question files (``pope``).
        images: image folder (``pope``, ``chair``).
        instances, captions: COCO instances / captions files (``chair``).
        synonyms: extra CHAIR synonyms ``{category: [word, ...]}`` (``chair``).
        data: the annotation file (``refcoco``: refs; ``coco``: instances) or folder (``mot``: sequences).
        split: the refs kept (``refcoco``; all when None).
        clip_len, stride: frames per clip and frame step (``mot``; ``clip_len`` None: the model's ``max_frames``).
        templates: a templates YAML replacing some of the shipped question paraphrases (the first one is asked).
        tasks: the ``shapes`` suite's tasks (default all, :data:`~taskmllm.eval.suites.SHAPES_TASKS`; its
            held-out split repeats those of them it covers), e.g. ``("exist", "color", "count")`` for a model whose
            experts are not trained yet.
    """

    n: Optional[int] = None
    seed: int = DEFAULT_EVAL_SEED
    world: Optional[WorldConfig] = None
    batch_size: int = 16
    progress: bool = True
    pope_questions: Sequence[Union[str, Path]] = ()
    images: Optional[Union[str, Path]] = None
    instances: Optional[Union[str, Path]] = None
    captions: Optional[Union[str, Path]] = None
    synonyms: Optional[Mapping[str, Collection[str]]] = field(default=None)
    data: Optional[Union[str, Path]] = None
    split: Optional[str] = None
    clip_len: Optional[int] = None
    stride: int = 1
    templates: Optional[Union[str, Path]] = None
    tasks: Optional[Sequence[str]] = None

    def need_data(self, suite: str) -> Union[str, Path]:
        """``data``, or a ConfigError naming the option the suite needs."""
        if self.data is None:
            raise ConfigError(f"suite {suite!r} needs its annotation files: --data PATH (see taskmllm eval --help)")
        return self.data

    def __post_init__(self) -> None:
        for name, low in (("n", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is None and name == "n":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"EvalOptions.{name} must be an integer >= {low}, got {value!r}")
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in SHAPES_TASKS]
            if unknown or not self.tasks:
                raise ConfigError(f"EvalOptions.tasks: {unknown or 'none given'}; the shapes suite's tasks are "
                                  f"{', '.join(SHAPES_TASKS)}")


@dataclass(frozen=True)
class Suite:
    """A registered suite: how to run it and how long answers may be."""

    name: str
    description: str
    run: Callable[[Answerer, EvalOptions], SuiteOutput]
    max_new_tokens: int


def _n(o: EvalOptions) -> int:
    """``o.n``, or the ShapesWorld suites' default of 200."""
    return 200 if o.n is None else o.n


def _shapes(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    tasks = tuple(o.tasks or SHAPES_TASKS)
    return run_shapes(answer, _n(o), o.seed, o.world, o.batch_size, tasks,
                      tuple(t for t in HELDOUT_TASKS if t in tasks), progress=o.progress)


def _pope_shapes(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    return run_pope_shapes(answer, _n(o), o.seed, o.world, o.batch_size, progress=o.progress)


def _chair_shapes(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    return run_chair_shapes(answer, _n(o), o.seed, o.world, o.batch_size, progress=o.progress)


def _pope(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    if not o.pope_questions:
        raise ConfigError("suite 'pope' needs POPE question files (--pope-questions FILE [FILE ...])")
    return run_pope(answer, list(o.pope_questions), o.images, o.n, o.batch_size, o.progress)


def _chair(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    if o.instances is None:
        raise ConfigError("suite 'chair' needs a COCO instances file (--instances FILE)")
    return run_chair(answer, o.instances, o.captions, o.images, o.n, seed=o.seed, synonyms=o.synonyms,
                     batch_size=o.batch_size, progress=o.progress)


def _refcoco(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    if o.instances is None:
        raise ConfigError("suite 'refcoco' needs the COCO instances file of the refs (--instances FILE)")
    return run_refcoco(answer, o.need_data("refcoco"), o.instances, o.images, o.split, o.n, o.batch_size, o.progress,
                       o.templates)


def _coco(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    return run_coco(answer, o.need_data("coco"), o.images, o.n, o.batch_size, o.progress, o.templates)


def _mot(answer: Answerer, o: EvalOptions) -> SuiteOutput:
    return run_mot(answer, o.need_data("mot"), o.clip_len or 8, o.stride, o.n, o.batch_size, o.progress, o.templates)


SUITES: Mapping[str, Suite] = MappingProxyType({
    "shapes": Suite("shapes", "all ShapesWorld tasks on a fresh test world + held-out compositions", _shapes, 48),
    "pope-shapes": Suite("pope-shapes", "POPE random/popular/adversarial on ShapesWorld", _pope_shapes, 8),
    "chair-shapes": Suite("chair-shapes", "CHAIR of ShapesWorld captions", _chair_shapes, 64),
    "pope": Suite("pope", "POPE question files (COCO) of the POPE repository", _pope, 8),
    "chair": Suite("chair", "CHAIR on COCO instances + captions", _chair, 128),
    "refcoco": Suite("refcoco", "referring segmentation and REC on RefCOCO-style refs", _refcoco, 48),
    "coco": Suite("coco", "box (and mask) AP on COCO instances", _coco, 96),
    "mot": Suite("mot", "tracking from a first-frame box on MOT sequences", _mot, 32),
})


def run_suite(name: str, answer: Answerer, options: Optional[EvalOptions] = None) -> SuiteOutput:
    """Run suite ``name`` with ``answer`` (see :mod:`taskmllm.eval.suites` for the answer contract).

    Raises:
        ConfigError: unknown suite or missing files for a real-data suite.
    """
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return SUITES[name].run(answer, options or EvalOptions())


def report_suite(name: str, answer: Answerer, out: Union[str, Path], options: Optional[EvalOptions] = None,
                 meta: Optional[Mapping[str, Any]] = None) -> Report:
    """:func:`run_suite` then write ``results.json``, ``results.md`` and the suite's plots into ``out``.

    ``meta`` (model, intervention, ...) is written first in the results; ``wall_s`` is the suite's run time.
    """
    start = time.perf_counter()
    output = run_suite(name, answer, options)
    results = {"suite": name, **(meta or {}), "wall_s": round(time.perf_counter() - start, 2), **output.results}
    return write_report(results, Path(out), output.plots, title=f"taskmllm eval: {name}")


def evaluate(model: Union[str, Path], suite: str, out: Union[str, Path], options: Optional[EvalOptions] = None,
             intervention: Optional[str] = None, tau: Optional[float] = None,
             max_new_tokens: Optional[int] = None, device: str = "cpu",
             generation: Optional[Mapping[str, Any]] = None, dtype: Optional[torch.dtype] = None,
             quantize: Optional[str] = None) -> Report:
    """Load the checkpoint directory ``model`` into a Pipeline, run ``suite`` on it and write the report to ``out``.

    ``dtype`` / ``quantize``: load the model as ``Pipeline.from_pretrained`` does with them (evaluate the precision
    you will run), recorded in the report's metadata.

    ``generation``: further ``generate`` options for every answer (``repetition_penalty``,
    ``no_repeat_ngram_size``, ...), checked before the model loads and recorded in the report's metadata.

    Raises:
        CheckpointError: ``model`` is not a checkpoint directory.
        ConfigError: unknown suite / intervention, missing real-data files, ``out`` an existing file, a bad
            ``max_new_tokens`` or ``device``.
    """
    from taskmllm.router.pipeline import Pipeline

    if suite not in SUITES:  # fail before loading the model
        raise ConfigError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    from taskmllm.model.io import check_output_dir
    from taskmllm.zoo import resolve_checkpoint

    check_output_dir(out, "eval --out")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    from taskmllm.model.generation import check_generation

    generation = check_generation(dict(generation or {}))

    path = resolve_checkpoint(model)
    if not path.is_dir():
        raise CheckpointError(path, "not a checkpoint directory (write one with JointModel.save_pretrained)")
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, quantize=quantize)  # by name: its calibration
    mllm = pipe.model.mllm
    hook = make_intervention(intervention, pipe, tau=tau)
    options = options or EvalOptions()
    if options.world is None:
        base = WorldConfig()
        options = replace(options, world=WorldConfig(num_frames=min(base.num_frames, mllm.config.max_frames)))
    if options.clip_len is None:
        options = replace(options, clip_len=mllm.config.max_frames)
    answer = pipeline_answerer(pipe, max_new_tokens or SUITES[suite].max_new_tokens, hook, **generation)
    meta = {"model": str(path), "intervention": repr(hook) if hook is not None else "none",
            "intervention_settings": pipe.intervention_source(intervention), "device": device, "seed": options.seed,
            "dtype": str(dtype or "as stored").removeprefix("torch."), "quantize": quantize or "none",
            **{k: v for k, v in generation.items() if k != "generator"}}
    return report_suite(suite, answer, out, options, meta)
