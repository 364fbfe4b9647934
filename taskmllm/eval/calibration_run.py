"""``taskmllm calibrate``: choose an intervention's settings for one model on ShapesWorld's ``val`` world.

    taskmllm calibrate --model tiny --intervention vhr --split val --n 40

The validation suite (:class:`ValSuite`, built once): POPE random / popular / adversarial questions about ``n``
scenes of the ``val`` split of the evaluation world (seed ``DEFAULT_EVAL_SEED``; those scenes are neither the
training scenes nor the ``test`` scenes ``taskmllm eval`` reports) and one caption of each scene, answered as the
``pope-shapes`` / ``chair-shapes`` suites answer them. Its metrics: ``pope_accuracy`` (mean over the three
splits), ``pope_adversarial_accuracy``, ``pope_f1``, ``pope_yes_ratio``, ``chair_s``, ``chair_i``, ``recall``,
``mean_length``. The objective (:class:`~taskmllm.eval.calibrate.Objective`): POPE accuracy − CHAIR_S, caption
recall may drop at most 0.02 below the plain model's, and a candidate must beat the plain model by 0.01 —
otherwise the identity settings are stored (the calibration says: leave this model alone).

The grids (:mod:`taskmllm.eval.calibrate`): VHR alpha x layer sets as fractions of depth; VAR p x rho x tau in one
mode — an official-mode candidate whose sinks include no image token on any validation prompt is the identity and
is scored as the plain model without running it (the record says so, with the sinks found); ZeroTuning: every head
profiled first (:func:`~taskmllm.model.interventions.zerotuning_calibration.profile_heads`, scaled up and down
alone, scored by the log-likelihood of the right Yes/No on the val POPE questions), then the up-effective heads
with gammas > 1 and the down-effective heads with gammas < 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from taskmllm.data.shapesworld import WorldConfig
from taskmllm.errors import ConfigError
from taskmllm.eval.calibrate import (LAYER_SETS, CalibrationResult, Objective, grid_search, var_grid, vhr_grid,
                                     zerotuning_grid)
from taskmllm.eval.hallucination import pope_summary
from taskmllm.eval.suites import (DEFAULT_EVAL_SEED, answer_all, pipeline_answerer, pope_shapes_samples,
                                  score_task, shapes_items)
from taskmllm.model.interventions import (VAR, VHR, ZeroTuning, all_heads, gradient_profile, likelihood_score,
                                          profile_heads)
from taskmllm.model.interventions.hooks import decoder_layers
from taskmllm.model.interventions.zerotuning_calibration import next_token_logits
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.router.pipeline import Pipeline

CALIBRATION_SPLITS = ("val", "train")  # never the split a report is made on
POPE_TOKENS, CAPTION_TOKENS = 8, 64  # the pope-shapes / chair-shapes suites' answer lengths
PROFILES = ("scaled", "gradient")  # ZeroTuning's head profile: each head run scaled, or its first-order estimate


@dataclass(frozen=True)
class CalibrationOptions:
    """Settings of one calibration run.

    Attributes:
        n: val scenes (POPE questions about each, up to 3 yes + 3 no per POPE split, and one caption each).
        seed: world seed (the evaluation world: its ``val`` scenes are unseen in training and in ``test``).
        split: ``"val"`` (or ``"train"``); ``test``/``heldout`` are refused.
        world: scene parameters (default: ``WorldConfig`` with the model's frame count).
        batch_size: questions per model call.
        objective: the objective and constraints.
        var_mode: VAR's mode for the grid; ps / rhos / taus: VAR's grid (tau None = the per-model default).
        alphas / layer_sets: VHR's grid; gammas: ZeroTuning's; profile_n: scenes whose POPE questions profile
            ZeroTuning's heads (default ``n``); profile: ``"scaled"`` (the paper: each head scaled up and down
            alone, ``2 * heads + 1`` forwards) or ``"gradient"`` (its first-order estimate from one backward,
            :func:`~taskmllm.model.interventions.zerotuning_calibration.gradient_profile`, for LMs with many heads).
        progress: progress lines on stderr.
    """

    n: int = 40
    seed: int = DEFAULT_EVAL_SEED
    split: str = "val"
    world: Optional[WorldConfig] = None
    batch_size: int = 16
    objective: Objective = field(default_factory=Objective)
    var_mode: str = "official"
    ps: Sequence[float] = (0.2, 0.4, 0.6)
    rhos: Sequence[float] = (0.3, 0.5, 0.8)
    taus: Sequence[Optional[float]] = (None,)
    alphas: Sequence[float] = (1.25, 1.5, 2.0)
    layer_sets: Sequence[str] = ("paper", "late-half", "late-quarter")
    gammas: Sequence[float] = (0.5, 0.75, 1.25, 1.5, 2.0)
    profile_n: Optional[int] = None
    profile: str = "scaled"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in CALIBRATION_SPLITS:
            raise ConfigError(f"calibrate on one of {list(CALIBRATION_SPLITS)}, not {self.split!r}: settings chosen "
                              f"on the split a report is made on would overstate what they do")
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown head profile {self.profile!r}; known: {list(PROFILES)}")
        if self.n < 1 or self.batch_size < 1 or (self.profile_n is not None and self.profile_n < 1):
            raise ConfigError(f"n, batch_size and profile_n must be >= 1, got {self.n}, {self.batch_size}, "
                              f"{self.profile_n}")
        # every grid value is checked before anything runs (the interventions' own range checks)
        unknown = sorted(set(self.layer_sets) - set(LAYER_SETS))
        if unknown:
            raise ConfigError(f"unknown layer sets {unknown}; known: {sorted(LAYER_SETS)}")
        for alpha in self.alphas:
            VHR(alpha=alpha)
        for p in self.ps:
            for rho in self.rhos:
                for tau in self.taus:
                    VAR(p=p, rho=rho, tau=tau, mode=self.var_mode)
        for gamma in self.gammas:
            ZeroTuning(gamma=gamma)


class ValSuite:
    """POPE questions and caption prompts of the validation scenes, built once; ``suite(intervention)`` answers
    them all (None = the plain model) and returns the metrics (module docstring). The plain model's metrics are
    computed once and reused."""

    def __init__(self, pipe: "Pipeline", options: CalibrationOptions) -> None:
        self.pipe = pipe
        self.options = options
        world = options.world or WorldConfig(num_frames=min(WorldConfig().num_frames, pipe.model.mllm.config.max_frames))
        self.world = world
        self.pope = pope_shapes_samples(options.n, options.seed, world, split=options.split)
        self.captions = shapes_items("caption", options.n, options.seed, world, options.split)
        self._plain: Optional[dict[str, float]] = None
        self._sinks: dict[tuple, dict[str, Any]] = {}

    def pairs(self) -> list[tuple[Any, str]]:
        """Every ``(image, prompt)`` the suite asks (POPE questions, then caption prompts)."""
        return [(s.image, s.turns[0][0]) for samples in self.pope.values() for s in samples] + \
            [(it.visual, it.prompt) for it in self.captions]

    def __call__(self, intervention: Any) -> dict[str, float]:
        if intervention is None and self._plain is not None:
            return dict(self._plain)
        if isinstance(intervention, VAR) and intervention.mode == "official" and intervention.p > 0 and \
                not self.visual_sinks(intervention)["layers"]:
            return dict(self(None))  # no image token is a sink on any prompt: official VAR changes nothing
        metrics = self._run(intervention)
        if intervention is None:
            self._plain = dict(metrics)
        return metrics

    def _run(self, intervention: Any) -> dict[str, float]:
        o = self.options
        pope_answer = pipeline_answerer(self.pipe, POPE_TOKENS, intervention)
        splits = {}
        for name, samples in self.pope.items():
            results = answer_all(pope_answer, [(s.image, s.turns[0][0]) for s in samples], o.batch_size,
                                 f"val-pope/{name}", progress=False)
            splits[name] = ([r.text for r in results], [s.meta["label"] for s in samples])
        pope = pope_summary(splits)
        results = answer_all(pipeline_answerer(self.pipe, CAPTION_TOKENS, intervention),
                             [(it.visual, it.prompt) for it in self.captions], o.batch_size, "val-chair", False)
        chair = score_task("caption", self.captions, results)
        return {"pope_accuracy": pope["mean_accuracy"], "pope_adversarial_accuracy":
                pope["splits"]["adversarial"]["accuracy"], "pope_f1": pope["mean_f1"],
                "pope_yes_ratio": pope["mean_yes_ratio"], "chair_s": chair["chair_s"], "chair_i": chair["chair_i"],
                "recall": chair["recall"], "mean_length": chair["mean_length"]}

    def visual_sinks(self, var: VAR) -> dict[str, Any]:
        """Official-mode VAR's sinks on every validation prompt (one prefill each, nothing changed): ``{"tau",
        "sink_dims", "layers": layers where some prompt has a sink inside its image, "prompts_with_visual_sink"}``."""
        mllm = self.pipe.model.mllm
        probe = VAR(p=0.0, rho=var.rho, tau=var.tau_for(mllm), sink_dims=var.dims_for(mllm), layers=var.layer_spec,
                    mode="official")
        key = (probe.tau, tuple(probe.sink_dims), None if var.layer_spec is None else tuple(var.layer_spec))
        if key not in self._sinks:
            layers: set[int] = set()
            hit = 0
            pairs = self.pairs()
            for start in range(0, len(pairs) if probe.sink_dims else 0, self.options.batch_size):
                chunk = pairs[start:start + self.options.batch_size]
                batch = self.pipe.processor([p for _, p in chunk], [v for v, _ in chunk])
                next_token_logits(mllm, batch, probe)
                image = (batch.input_ids == mllm.image_id).to(mllm.device)
                per_prompt = torch.zeros(len(chunk), dtype=torch.bool, device=mllm.device)
                for layer, flags in probe.sinks.items():
                    visual = (flags & image).any(-1)
                    per_prompt |= visual
                    if bool(visual.any()):
                        layers.add(int(layer))
                hit += int(per_prompt.sum())
            self._sinks[key] = {"tau": probe.tau, "sink_dims": list(probe.sink_dims), "layers": sorted(layers),
                                "prompts_with_visual_sink": hit, "prompts": len(pairs)}
        return self._sinks[key]

    def yes_no_batch(self, n_images: int) -> tuple[Batch, list[int], list[int]]:
        """The POPE questions about the first ``n_images`` scenes (each (scene, object) once), as a batch that ends
        right before the answer's first differing token, the candidate ids ``[yes, no]`` and labels (0 yes, 1 no)."""
        seen, prompts, images, labels = set(), [], [], []
        for samples in self.pope.values():
            for s in samples:
                key = (s.meta["index"], s.meta["object"])
                if s.meta["index"] < n_images and key not in seen:
                    seen.add(key)
                    prompts.append(s.turns[0][0])
                    images.append(s.image)
                    labels.append(0 if s.meta["label"] == "yes" else 1)
        return (*answer_prefix_batch(self.pipe, prompts, images, ("Yes.", "No.")), labels)


def answer_prefix_batch(pipe: "Pipeline", prompts: Sequence[str], images: Sequence[Any],
                        answers: Sequence[str]) -> tuple[Batch, list[int]]:
    """A left-padded batch of ``prompts`` followed by the tokens all ``answers`` share (e.g. the separator space a
    tokenizer keeps as its own token), and each answer's first token after them (the candidates to score).

    Raises:
        ConfigError: two answers start with the same tokens throughout (nothing tells them apart).
    """
    processor = pipe.processor
    tok = processor.tokenizer
    encoded = [tok.encode(processor.chat.answer_sep + a, add_special_tokens=False) for a in answers]
    common = 0
    while all(len(e) > common + 1 for e in encoded) and len({e[common] for e in encoded}) == 1:
        common += 1
    candidates = [e[common] for e in encoded]
    if len(set(candidates)) != len(candidates):
        raise ConfigError(f"the answers {list(answers)} do not differ in one token after their shared prefix")
    batch = processor(list(prompts), list(images))
    bsz = batch.input_ids.shape[0]
    prefix = torch.tensor(encoded[0][:common], dtype=torch.long).expand(bsz, -1)
    return Batch(torch.cat([batch.input_ids, prefix], 1),
                 torch.cat([batch.attention_mask, torch.ones_like(prefix, dtype=batch.attention_mask.dtype)], 1),
                 None, batch.pixel_values, list(batch.frames_per_sample), list(batch.image_sizes)), candidates


@dataclass
class Calibration:
    """One calibration: the grid search's result and what is stored beside the settings."""

    result: CalibrationResult
    extra: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The JSON-able calibration record: objective, scores, the data used, every candidate and the analysis."""
        table = [{k: row[k] for k in ("settings", "metrics", "score", "feasible")} for row in self.result.table]
        return {**self.result.record(), **self.extra, "table": table}


def _log(options: CalibrationOptions) -> Callable[[int, int, dict[str, Any]], None]:
    def progress(i: int, n: int, row: dict[str, Any]) -> None:
        if options.progress:
            m = row["metrics"]
            print(f"[calibrate] {i}/{n} {row['settings']}: score {row['score']:.4f} (POPE acc "
                  f"{m['pope_accuracy']:.3f}, CHAIR_S {m['chair_s']:.3f}, recall {m['recall']:.3f})"
                  f"{'' if row['feasible'] else ' infeasible'}", file=sys.stderr, flush=True)

    return progress


def candidates_for(name: str, suite: ValSuite) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The grid of ``name`` for this model and the analysis that built it (ZeroTuning's head profile)."""
    o = suite.options
    mllm = suite.pipe.model.mllm
    if name == "vhr":
        return vhr_grid(len(decoder_layers(mllm.llm)), o.alphas, o.layer_sets), {}
    if name == "var":
        grid = var_grid(o.ps, o.rhos, o.taus, o.var_mode)
        sinks = [suite.visual_sinks(VAR.from_settings(c)) for c in grid if o.var_mode == "official"]
        unique = list({(s["tau"], tuple(s["sink_dims"])): s for s in sinks}.values())
        if not unique:
            return grid, {}
        note = {"note": "no image token is a sink on any val prompt at these taus: official-mode VAR is the identity "
                        "and every candidate scores as the plain model"} if not any(s["layers"] for s in unique) else {}
        return grid, {"visual_sinks": unique, **note}
    if name == "zerotuning":
        batch, candidates, labels = suite.yes_no_batch(o.profile_n or o.n)
        if o.progress:
            print(f"[calibrate] profiling {len(all_heads(mllm))} heads ({o.profile}) on {len(labels)} val POPE "
                  f"questions", file=sys.stderr, flush=True)
        profile = (gradient_profile(mllm, batch, candidates, labels) if o.profile == "gradient" else
                   profile_heads(likelihood_score(mllm, batch, candidates, labels), all_heads(mllm)))
        up, down = profile.heads("up"), profile.heads("down")
        grid = zerotuning_grid({"up": up, "down": down}, o.gammas)
        return grid, {"profile": {"method": o.profile, "questions": len(labels), "score": "mean log p(right Yes/No)",
                                  "base": profile.base, "gamma_up": profile.gamma_up,
                                  "gamma_down": profile.gamma_down, "up": [list(h) for h in up],
                                  "down": [list(h) for h in down], "neutral": len(profile.heads("neutral"))}}
    raise ConfigError(f"unknown intervention {name!r}; known: ['var', 'vhr', 'zerotuning']")


def calibrate_model(pipe: "Pipeline", name: str, options: CalibrationOptions = CalibrationOptions()) -> Calibration:
    """Run the grid of intervention ``name`` on the validation suite and pick its settings (module docstring).

    Returns:
        :class:`Calibration`: ``result.chosen()`` are the settings to store (identity when nothing helped),
        ``record()`` the calibration record.
    """
    suite = ValSuite(pipe, options)
    grid, analysis = candidates_for(name, suite)
    extra = {"split": options.split, "seed": options.seed, "n_images": options.n,
             "pope_questions": sum(len(v) for v in suite.pope.values()), "captions": len(suite.captions), **analysis}
    if not grid:  # e.g. ZeroTuning with no up- or down-effective head: nothing to try
        base = suite(None)
        result = CalibrationResult(name, None, options.objective.score(base), base, options.objective.score(base),
                                   [], options.objective)
        return Calibration(result, {**extra, "note": "no candidate setting (no head changes the val score)"})
    result = grid_search(name, grid, suite, options.objective, _log(options))
    return Calibration(result, extra)



def _short(settings: dict[str, Any]) -> str:
    """``k=v`` of the settings that are set (a head list is shown by its length)."""
    def show(v: Any) -> str:
        return f"{len(v)} heads" if isinstance(v, list) and v and isinstance(v[0], list) else str(v)

    return ", ".join(f"{k}={show(v)}" for k, v in settings.items() if v is not None)


def summary_lines(calibration: Calibration) -> list[str]:
    """A short markdown report of a calibration: the plain model, every candidate, the choice."""
    res = calibration.result
    keys = ("pope_accuracy", "pope_adversarial_accuracy", "chair_s", "chair_i", "recall", "mean_length")
    head = "| settings | score | " + " | ".join(keys) + " | feasible |"
    lines = [f"{res.intervention}: {calibration.extra.get('pope_questions')} POPE questions and "
             f"{calibration.extra.get('captions')} captions of the {calibration.extra.get('split')} world "
             f"(seed {calibration.extra.get('seed')})", "", head, "|" + "---|" * (len(keys) + 3)]

    def row(name: str, metrics: dict, score: float, feasible: Any) -> str:
        return f"| {name} | {score:.4f} | " + " | ".join(f"{metrics[k]:.3f}" for k in keys) + f" | {feasible} |"

    lines.append(row("plain model", res.baseline, res.baseline_score, "–"))
    lines += [row(_short(r["settings"]), r["metrics"], r["score"], r["feasible"]) for r in res.table]
    chosen = "identity (no candidate beat the plain model)" if res.best is None else _short(res.best)
    lines += ["", f"chosen: {chosen}"]
    for key in ("visual_sinks", "profile", "note"):
        if key in calibration.extra:
            lines.append(f"{key}: {calibration.extra[key]}")
    return lines
