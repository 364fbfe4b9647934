"""ZeroTuning's head profiling and gamma calibration, as library functions over a generic scoring callback.

A **score** is any ``Callable[[Optional[intervention]], float]`` — higher is better — that runs the model on
calibration data under the given intervention (None = the plain model). Nothing here knows the data set: the
builders below score yes/no-style items from a :class:`~taskmllm.model.processor.Batch` and candidate answer
tokens, and any other evaluation (a POPE suite, a caption metric) can be wrapped the same way.

* :func:`profile_heads` scales each head's initial-token attention up (``gamma_up``) and down (``gamma_down``)
  alone and classifies it **up-effective** (scaling up helps more than scaling down, by more than ``tolerance``),
  **down-effective** (the reverse) or neutral; ZeroTuning then scales the dominant type (the more numerous).
* :func:`calibrate_gamma` picks the gamma (1 = the plain model is always a candidate) that maximises a score:
  **supervised** with :func:`accuracy_score` / :func:`likelihood_score` on labelled validation items,
  **unsupervised** with :func:`entropy_score` (minus the mean entropy of the answer distribution) on unlabelled
  inputs. Calibrate on a validation split, never on the split you report.

The score builders read the token that follows each prompt's last real token: build the batch so that the
answer's first candidate token comes next (append any answer separator the chat format puts before the answer —
e.g. the space of ``" ASSISTANT: Yes"``, which the tokenizer may keep as its own token).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union

import torch

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import context_for, decoder_layers, head_layout, resolve_layers
from taskmllm.model.interventions.masks import last_real_positions
from taskmllm.model.interventions.zerotuning import Head, InitialTokenBias, ZeroTuning
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.generation import Intervention
    from taskmllm.model.mllm import TaskMLLM

Score = Callable[[Optional["Intervention"]], float]
HeadKind = Literal["up", "down", "neutral"]
DEFAULT_GAMMAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def all_heads(model: "TaskMLLM", layers: Optional[Sequence[int]] = None) -> list[Head]:
    """Every ``(layer, head)`` of the LM (of ``layers`` only when given; negative indices allowed)."""
    num_layers = len(decoder_layers(model.llm))
    heads, _ = head_layout(model.llm)
    chosen = resolve_layers(list(range(num_layers)) if layers is None else list(layers), num_layers)
    return [(layer, h) for layer in chosen for h in range(heads)]


@dataclass
class HeadProfile:
    """Scores of each head scaled up and down alone.

    Attributes:
        base: score of the plain model; up / down: ``{head: score}`` with ``gamma_up`` / ``gamma_down``.
        kinds: ``{head: "up" | "down" | "neutral"}``.
    """

    base: float
    gamma_up: float
    gamma_down: float
    tolerance: float
    up: dict[Head, float] = field(default_factory=dict)
    down: dict[Head, float] = field(default_factory=dict)
    kinds: dict[Head, HeadKind] = field(default_factory=dict)

    def heads(self, kind: HeadKind) -> list[Head]:
        """The heads of one kind, sorted."""
        return sorted(h for h, k in self.kinds.items() if k == kind)

    @property
    def dominant(self) -> Literal["up", "down"]:
        """The more numerous of up- and down-effective heads (``"up"`` on a tie)."""
        return "up" if len(self.heads("up")) >= len(self.heads("down")) else "down"


def classify(base: float, up: float, down: float, tolerance: float = 0.0) -> HeadKind:
    """One head's kind from its scores: the direction that helps more, if it helps by more than ``tolerance``."""
    gain_up, gain_down = up - base, down - base
    if gain_up > tolerance and gain_up >= gain_down:
        return "up"
    if gain_down > tolerance and gain_down > gain_up:
        return "down"
    return "neutral"


def profile_heads(score: Score, heads: Sequence[Head], gamma_up: float = 2.0, gamma_down: float = 0.5,
                  tolerance: float = 0.0) -> HeadProfile:
    """Scale each head alone up and down and classify it (``2 * len(heads) + 1`` calls of ``score``).

    Args:
        score: the scoring callback (higher is better); called with a :class:`ZeroTuning` or None.
        heads: the ``(layer, head)`` pairs to profile (e.g. :func:`all_heads`).
        gamma_up, gamma_down: the probe scales (> 1 and < 1).
        tolerance: a head is neutral unless a direction beats the base score by more than this.
    """
    if not gamma_up > 1.0 > gamma_down > 0.0:
        raise ConfigError(f"profile_heads needs gamma_up > 1 > gamma_down > 0, got {gamma_up}, {gamma_down}")
    if not heads:
        raise ConfigError("profile_heads needs at least one (layer, head) to profile")
    profile = HeadProfile(float(score(None)), float(gamma_up), float(gamma_down), float(tolerance))
    for head in heads:
        head = (int(head[0]), int(head[1]))
        profile.up[head] = float(score(ZeroTuning(gamma=gamma_up, heads=[head])))
        profile.down[head] = float(score(ZeroTuning(gamma=gamma_down, heads=[head])))
        profile.kinds[head] = classify(profile.base, profile.up[head], profile.down[head], tolerance)
    return profile


def gradient_profile(model: "TaskMLLM", batch: Batch, candidates: Sequence[int], labels: Sequence[int],
                     heads: Optional[Sequence[Head]] = None, gamma_up: float = 2.0, gamma_down: float = 0.5,
                     tolerance: float = 0.0) -> HeadProfile:
    """:func:`profile_heads` to first order, in one forward and one backward instead of ``2 * heads + 1`` forwards
    (a 30-layer, 9-head LM has 270 heads): the gradient ``g`` of :func:`likelihood_score` with respect to every
    head's ``log gamma`` at 0 estimates a head's scores as ``base + g * log(gamma_up)`` and
    ``base + g * log(gamma_down)``, classified as :func:`profile_heads` does. Exact in the limit of small scales;
    the larger ``|log gamma|``, the more the estimate can miss curvature (measure against :func:`profile_heads` on
    a subset of heads before relying on it).

    Args:
        heads: the heads to classify (default: every head).
    """
    if not gamma_up > 1.0 > gamma_down > 0.0:
        raise ConfigError(f"gradient_profile needs gamma_up > 1 > gamma_down > 0, got {gamma_up}, {gamma_down}")
    target = _labels(labels, batch, candidates).to(model.device)
    ctx = context_for(model, batch)
    num_heads, _ = head_layout(model.llm)
    log_gammas = torch.zeros(len(decoder_layers(model.llm)), num_heads, device=model.device, requires_grad=True)
    with torch.enable_grad():
        logp = _candidate_logits(model, ctx, candidates, InitialTokenBias(log_gammas), grad=True).log_softmax(-1)
        base = logp[torch.arange(len(target), device=model.device), target].mean()
        (grad,) = torch.autograd.grad(base, log_gammas)  # (layers, heads) d score / d log gamma
    profile = HeadProfile(float(base.detach()), float(gamma_up), float(gamma_down), float(tolerance))
    up, down = math.log(gamma_up), math.log(gamma_down)
    for layer, head in (all_heads(model) if heads is None else heads):
        pair, g = (int(layer), int(head)), float(grad[int(layer), int(head)])
        profile.up[pair], profile.down[pair] = profile.base + g * up, profile.base + g * down
        profile.kinds[pair] = classify(profile.base, profile.up[pair], profile.down[pair], tolerance)
    return profile


@dataclass
class GammaCalibration:
    """The chosen gamma and every candidate's score (``table``: ``[(gamma, score), ...]`` in grid order)."""

    gamma: float
    score: float
    heads: list[Head]
    table: list[tuple[float, float]]

    def intervention(self) -> ZeroTuning:
        """The calibrated :class:`ZeroTuning`."""
        return ZeroTuning(gamma=self.gamma, heads=self.heads)


def calibrate_gamma(score: Score, heads: Sequence[Head], gammas: Sequence[float] = DEFAULT_GAMMAS) -> GammaCalibration:
    """The gamma of ``gammas`` (1 added when missing) that maximises ``score`` with ``heads`` scaled; ties go to
    the gamma closest to 1 (the smaller change)."""
    if not heads:
        raise ConfigError("calibrate_gamma needs at least one (layer, head)")
    grid = sorted({float(g) for g in gammas} | {1.0})
    heads = sorted((int(l), int(h)) for l, h in heads)
    table = [(g, float(score(None if g == 1.0 else ZeroTuning(gamma=g, heads=heads)))) for g in grid]
    best = max(table, key=lambda row: (row[1], -abs(row[0] - 1.0)))
    return GammaCalibration(best[0], best[1], heads, table)


def calibrate_from_profile(score: Score, profile: HeadProfile, gammas: Sequence[float] = DEFAULT_GAMMAS
                           ) -> GammaCalibration:
    """Calibrate gamma for the profile's dominant heads, on its side of 1 (> 1 for up-, < 1 for down-effective)."""
    kind = profile.dominant
    heads = profile.heads(kind)
    if not heads:
        return GammaCalibration(1.0, profile.base, [], [(1.0, profile.base)])
    side = [g for g in gammas if (g > 1.0 if kind == "up" else g < 1.0)]
    return calibrate_gamma(score, heads, side)


# ------------------------------------------------------------------------------------------ scores
@torch.no_grad()
def next_token_logits(model: "TaskMLLM", batch: Union[Batch, GenerationContext],
                      intervention: Optional["Intervention"] = None) -> torch.Tensor:
    """``(B, V)`` float32 logits of the token after each sample's last real prompt token (any padding side),
    under ``intervention`` (attached for this prompt). A :class:`GenerationContext` (:func:`context_for`) skips the
    vision tower: the score builders embed their batch once and reuse it for every call."""
    ctx = batch if isinstance(batch, GenerationContext) else context_for(model, batch)
    return _last_token_logits(model, ctx, intervention)


def _last_token_logits(model: "TaskMLLM", ctx: GenerationContext, intervention: Optional[Any]) -> torch.Tensor:
    """:func:`next_token_logits`' body, under the caller's grad mode."""
    from taskmllm.model.processor import positions

    mask = ctx.attention_mask
    last = last_real_positions(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    kwargs = dict(inputs_embeds=ctx.inputs_embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    cfg = model.llm.config  # logits = lm_head(hidden) unless the LM scales or soft-caps them
    plain_head = getattr(cfg, "final_logit_softcapping", None) is None and not hasattr(cfg, "logit_scale")
    with intervention.attach(model, ctx) if intervention is not None else contextlib.nullcontext():
        if plain_head:  # the LM head on the B read positions only, not on every position
            hidden = model.llm.get_decoder()(**kwargs).last_hidden_state[rows, last]
            return model.llm.get_output_embeddings()(hidden).float()
        return model.llm(**kwargs).logits[rows, last].float()


def _candidate_logits(model: "TaskMLLM", ctx: GenerationContext, candidates: Sequence[int],
                      intervention: Optional[Any], grad: bool = False) -> torch.Tensor:
    if len(candidates) < 2:
        raise InputError(f"need at least 2 candidate answer tokens, got {list(candidates)}")
    idx = torch.as_tensor(list(candidates), device=model.device)
    logits = _last_token_logits(model, ctx, intervention) if grad else next_token_logits(model, ctx, intervention)
    return logits.index_select(-1, idx)  # (B, C)


def _labels(labels: Sequence[int], batch: Batch, candidates: Sequence[int]) -> torch.Tensor:
    if len(labels) != batch.input_ids.shape[0]:
        raise InputError(f"{len(labels)} labels for a batch of {batch.input_ids.shape[0]}")
    bad = [y for y in labels if not 0 <= int(y) < len(candidates)]
    if bad:
        raise InputError(f"labels must index the {len(candidates)} candidates, got {bad}")
    return torch.as_tensor([int(y) for y in labels])


def accuracy_score(model: "TaskMLLM", batch: Batch, candidates: Sequence[int], labels: Sequence[int]) -> Score:
    """Supervised: the fraction of items whose most likely candidate token is the labelled one.

    Args:
        batch: ``B`` prompts; candidates: token ids of the answers (e.g. the ids of "Yes" and "No");
        labels: ``B`` indices into ``candidates``.
    """
    target = _labels(labels, batch, candidates)
    ctx = context_for(model, batch)

    def score(intervention: Optional["Intervention"]) -> float:
        pred = _candidate_logits(model, ctx, candidates, intervention).argmax(-1).cpu()
        return float((pred == target).float().mean())

    return score


def likelihood_score(model: "TaskMLLM", batch: Batch, candidates: Sequence[int], labels: Sequence[int]) -> Score:
    """Supervised and smooth (for profiling on few items): the mean log-probability of the labelled candidate
    among the candidates."""
    target = _labels(labels, batch, candidates)
    ctx = context_for(model, batch)

    def score(intervention: Optional["Intervention"]) -> float:
        logp = _candidate_logits(model, ctx, candidates, intervention).log_softmax(-1).cpu()
        return float(logp[torch.arange(len(target)), target].mean())

    return score


def entropy_score(model: "TaskMLLM", batch: Batch, candidates: Optional[Sequence[int]] = None) -> Score:
    """Unsupervised: minus the mean entropy (nats) of the answer distribution — over ``candidates`` when given,
    else over the whole vocabulary — at each sample's next token."""
    ctx = context_for(model, batch)

    def score(intervention: Optional["Intervention"]) -> float:
        logits = (next_token_logits(model, ctx, intervention) if candidates is None
                  else _candidate_logits(model, ctx, candidates, intervention))
        logp = logits.log_softmax(-1)
        return float((logp.exp() * logp).sum(-1).mean())

    return score
