"""Auxiliary training losses: training-only heads on the model's internal states, configured per stage as data.

A stage names them in ``stage.aux`` with their options (``{name: {weight: ..., ...}}``); the training loop
builds each from :data:`AUX_LOSSES`, hands every one the same :class:`AuxStates` of a forward and adds
``weight x loss``, knowing none of them by name. Their targets come from the samples' generic ground truth —
the objects' masks or boxes and class labels (:class:`~taskmllm.data.sample.ObjectGT`) and what the question
names (:class:`~taskmllm.data.sample.Grounding`) — so any grounded source feeds them: ShapesWorld's builder
today, RefCOCO/COCO annotations as well. A sample without that ground truth contributes nothing.

- ``focus`` (:class:`FocusLoss`) — region-phrase alignment: after ``layer`` LLM blocks, each visual token
  (they follow the question) says whether it shows what the question names (BCE).
- ``attr`` (:class:`AttributeLoss`) — the same tokens name the class labels (``labels``: e.g. category and
  color) of the object they show, so an answer that needs them finds them where its attention reads.
- ``patch`` (:class:`PatchLoss`) — the vision tower's own patch features name those labels (the direct
  supervision a from-scratch tower needs).
- ``words`` (:class:`WordLoss`) — the visual tokens (by default as the LLM receives them, after the projector)
  point where the LLM's own input embeddings of their labels' words point (" red", " circle"; cosine
  classification against the frozen word vectors), so a pretrained LLM reads them as it reads those words.
- ``lookup`` (:class:`LookupLoss`) — region-phrase alignment read from the question's side: the state that
  predicts the first answer token queries the visual tokens (a bilinear head) for what the question names, so it
  works when the image comes first and its tokens cannot see the question (where ``focus`` cannot be built).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.data.sample import Sample
from taskmllm.errors import ConfigError
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.schema import from_dict, suggest
from taskmllm.training.aux_targets import grounding_cover, label_maps


@dataclass
class AuxStates:
    """What an auxiliary loss may read of one joint forward.

    Attributes:
        layer_states: the LLM's hidden states by depth, each ``(B, L, H)``: ``[0]`` the input embeddings,
            ``[l]`` the output of block l.
        visual: ``(B, L)`` bool, the visual-token positions (frame by frame, in sample order).
        inputs: the batch's :class:`ExpertInputs` (vision features and grids; None for a text-only batch).
        max_frames: the model's frame budget (a longer video is sampled down as the processor does).
        labels: ``(B, L)`` the LM targets (``-100`` where unsupervised; the batch's host copy), or None: where
            the answers start.
    """

    layer_states: Sequence[torch.Tensor]
    visual: torch.Tensor
    inputs: Optional[ExpertInputs]
    max_frames: int
    labels: Optional[torch.Tensor] = None

    def answer_positions(self) -> torch.Tensor:
        """``(B,)`` per sample the position whose state predicts the first answer token (the first question's
        last token), -1 where the sample has no supervised answer (or the batch no labels)."""
        if self.labels is None:
            return torch.full((self.visual.shape[0],), -1, dtype=torch.long)
        supervised = self.labels != -100
        first = supervised.float().argmax(1)  # (B,) the first supervised position
        return torch.where(supervised.any(1), first - 1, torch.full_like(first, -1))

    def visual_tokens(self, layer: int) -> torch.Tensor:
        """``(F, N', H)`` hidden states of the visual tokens after ``layer`` blocks."""
        grid = self.inputs.visual_grid
        return self.layer_states[layer][self.visual].view(-1, grid[0] * grid[1], self.layer_states[layer].shape[-1])


@dataclass
class AuxContext:
    """What an auxiliary loss is built for: the model's widths and depth, and the data's label classes.

    Attributes:
        hidden_size: the LLM's width H; vision_width: the tower's width C; num_layers: the LLM's blocks.
        label_classes: per labelling kind, the classes the data sources declare (``SourceSpec.label_classes``).
        word_vectors: the LLM's input embedding of each phrase, ``list[str] -> (P, H)`` (the mean over a phrase's
            tokens; no gradient); None where the model has no tokenizer at hand (then ``words`` cannot be built).
        image_first: the model's layout (``tokens.image_first`` without ``tokens.repeat_question``): the visual
            tokens come before the question, so they cannot see it (``focus`` cannot be built).
    """

    hidden_size: int
    vision_width: int
    num_layers: int
    label_classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    word_vectors: Optional[Callable[[Sequence[str]], torch.Tensor]] = None
    image_first: bool = False


@dataclass
class AuxOptions:
    """Options every auxiliary loss has. ``weight``: its factor in the stage's loss (0 = off)."""

    weight: float = 1.0


class AuxLoss(nn.Module, ABC):
    """A training-only head and its loss; subclasses set ``options_cls`` and implement :meth:`loss`."""

    options_cls: ClassVar[type[AuxOptions]] = AuxOptions

    def __init__(self, options: AuxOptions, context: AuxContext) -> None:
        super().__init__()
        self.options = options

    @property
    def weight(self) -> float:
        return self.options.weight

    @property
    def depth(self) -> int:
        """The deepest LLM state the loss reads: ``n`` = after n blocks, 0 = the LLM's inputs or the vision
        features (a stage whose every loss has depth 0 need not run the LLM)."""
        return int(getattr(self.options, "layer", 0))

    @abstractmethod
    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        """A scalar loss of one forward of ``samples`` (zero, still on the graph, when none has a target)."""


# ---------------------------------------------------------------------------------------------- losses
@dataclass
class FocusOptions(AuxOptions):
    """``layer``: after how many LLM blocks the visual tokens are read; ``pos_weight``: BCE weight of a positive
    token (the few object tokens among many background ones)."""

    layer: int = 1
    pos_weight: float = 10.0


class FocusLoss(AuxLoss):
    """Region-phrase alignment: a linear logit on every visual token after ``layer`` blocks says whether the
    token shows what the question names (BCE against :func:`grounding_cover`).

    The visual tokens follow the question, so an LLM can mark the matching patches where they are and answer by
    attending to the marks; from the answer loss alone a from-scratch LLM does not find that lookup
    (``bench/vqa_probe.py``)."""

    options_cls = FocusOptions

    def __init__(self, options: FocusOptions, context: AuxContext) -> None:
        super().__init__(options, context)
        _check_layer(options.layer, context.num_layers)
        if context.image_first:
            raise ConfigError("stage.aux.focus: the visual tokens mark what the question names, so they must come "
                              "after it, and this model puts the image first (tokens.image_first: true); use "
                              "words or attr instead, or a fresh model with model.repeat_question: true (the "
                              "question before and after the image)")
        self.linear = nn.Linear(context.hidden_size, 1)

    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        grid = states.inputs.visual_grid
        hidden = states.layer_states[self.options.layer]
        targets, valid = grounding_cover(samples, grid, states.max_frames)
        tokens = hidden[states.visual].to(self.linear.weight.dtype)  # the head's dtype (bf16 under DeepSpeed bf16)
        logits = self.linear(tokens).float().squeeze(-1).view(targets.shape)  # (F, N')
        if not bool(valid.any()):
            return logits.sum() * 0.0
        valid = valid.to(logits.device)
        weight = torch.tensor(self.options.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits[valid], targets.to(logits)[valid], pos_weight=weight)


@dataclass
class LabelOptions(AuxOptions):
    """``labels``: the labelling kinds to classify (``category`` or keys of ``ObjectGT.labels``), one linear
    classifier each over the data's classes plus background."""

    labels: list[str] = field(default_factory=lambda: ["category"])


class _LabelHeads(AuxLoss):
    """Linear classifiers of the labels of ``labels`` on tokens of width ``width``; loss = sum of their CEs."""

    options_cls = LabelOptions

    def __init__(self, options: LabelOptions, context: AuxContext, width: int) -> None:
        super().__init__(options, context)
        self.classes = _label_classes(options.labels, context)
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(c) + 1) for k, c in self.classes.items()})

    def _loss(self, tokens: torch.Tensor, grid: tuple[int, int], states: AuxStates,
              samples: Sequence[Sample]) -> torch.Tensor:
        """``tokens (F, N, W)`` on ``grid`` against :func:`label_maps`."""
        maps = label_maps(samples, grid, states.max_frames, self.classes)
        terms = [F.cross_entropy(head(tokens.to(head.weight.dtype)).float().flatten(0, 1),
                                 maps[kind].to(tokens.device).flatten())
                 for kind, head in self.heads.items()]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


@dataclass
class AttributeOptions(LabelOptions):
    """``layer``: after how many LLM blocks the visual tokens are read."""

    layer: int = 1


class AttributeLoss(_LabelHeads):
    """The LLM's visual tokens after ``layer`` blocks name the labels of the object they show."""

    options_cls = AttributeOptions

    def __init__(self, options: AttributeOptions, context: AuxContext) -> None:
        super().__init__(options, context, context.hidden_size)
        _check_layer(options.layer, context.num_layers)

    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        return self._loss(states.visual_tokens(self.options.layer), states.inputs.visual_grid, states, samples)


class PatchLoss(_LabelHeads):
    """The vision tower's patch features name the labels of the object they show."""

    def __init__(self, options: LabelOptions, context: AuxContext) -> None:
        super().__init__(options, context, context.vision_width)

    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        return self._loss(states.inputs.features, states.inputs.grid, states, samples)


@dataclass
class WordOptions(LabelOptions):
    """``layer``: after how many LLM blocks the visual tokens are read (0: the LLM's inputs, the projector's
    output); ``background``: the word a token showing no object points to; ``scale``: the initial logit scale
    of the cosine similarities (learned, as CLIP's temperature); ``cover``: the share of a token an object must
    cover to name it (pooled tokens are coarse: a small object covers half of none); ``regress``: the weight of a
    second term that pulls each token onto its words (the mean of its labels' word vectors, or the background
    word's), not only toward them: ``|token - target|^2 / |target|^2`` (0 = off)."""

    layer: int = 0
    background: str = "background"
    scale: float = 10.0
    cover: float = 0.25
    regress: float = 0.0


class WordLoss(AuxLoss):
    """The visual tokens after ``layer`` blocks point in the direction of the LLM's input embedding of the
    words of their object's labels: per labelling kind, ``scale * cos(token, vector(" " + class))`` over the
    classes and the background word, cross-entropy against :func:`label_maps`.

    The classifier's weights are the LLM's own word vectors, read at every call (no gradient): a token that
    shows a red circle is pulled toward " red" and " circle", which the pretrained LLM already knows how to
    match against the question's words; the directions the labels do not fix stay free for the rest."""

    options_cls = WordOptions

    def __init__(self, options: WordOptions, context: AuxContext) -> None:
        super().__init__(options, context)
        if context.word_vectors is None:
            raise ConfigError("words needs the LLM's word vectors (a model with a tokenizer)")
        if not 0 <= options.layer <= context.num_layers:
            raise ConfigError(f"layer must be in 0..{context.num_layers} (0: the LLM's inputs), got {options.layer}")
        self.classes = _label_classes(options.labels, context)
        self.phrases = {k: [" " + options.background] + [" " + c for c in names] for k, names in self.classes.items()}
        self._vectors = context.word_vectors  # a function, not a module: the LLM's embedding stays the LLM's
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(options.scale))))

    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        raw = states.visual_tokens(self.options.layer).float()  # (F, N, H)
        tokens = F.normalize(raw, dim=-1)
        maps = label_maps(samples, states.inputs.visual_grid, states.max_frames, self.classes, self.options.cover)
        total, targets = tokens.new_zeros(()), []
        for kind, phrases in self.phrases.items():
            vectors = self._vectors(phrases).float().to(tokens.device)  # (K + 1, H)
            logits = self.log_scale.exp() * tokens @ F.normalize(vectors, dim=-1).T  # (F, N, K + 1)
            index = maps[kind].to(tokens.device)  # (F, N)
            total = total + F.cross_entropy(logits.flatten(0, 1), index.flatten())
            targets.append(vectors[index])  # (F, N, H): each token's word of this kind (background: that word)
        if self.options.regress:
            target = torch.stack(targets).mean(0)  # (F, N, H): the mean of the token's words
            error = (raw - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-6)
            total = total + self.options.regress * error.mean()
        return total


@dataclass
class LookupOptions(AuxOptions):
    """``layer``: after how many LLM blocks both sides are read; ``dim``: the width of the query and key
    projections; ``pos_weight``: BCE weight of a positive token."""

    layer: int = 4
    dim: int = 64
    pos_weight: float = 10.0


class LookupLoss(AuxLoss):
    """Region-phrase alignment from the question's side: after ``layer`` blocks, the state that predicts the
    first answer token is projected to a query, every visual token of its sample to a key, and their scaled dot
    product (one attention logit) says whether the token shows what the question names (BCE against
    :func:`grounding_cover`; a question naming nothing present has no positive token).

    It asks of the answer position what an attention head must do to answer "is there ...?": find the tokens
    that match the phrase, or none. Unlike ``focus`` it needs no question before the image."""

    options_cls = LookupOptions

    def __init__(self, options: LookupOptions, context: AuxContext) -> None:
        super().__init__(options, context)
        _check_layer(options.layer, context.num_layers)
        if options.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {options.dim}")
        self.query = nn.Linear(context.hidden_size, options.dim)
        self.key = nn.Linear(context.hidden_size, options.dim)
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def logits(self, states: AuxStates, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, N')`` the lookup logits of every frame's visual tokens and ``(F,)`` bool: the frame's sample has
        an answer position."""
        tokens = states.visual_tokens(self.options.layer).to(self.key.weight.dtype)  # (F, N', H)
        hidden = states.layer_states[self.options.layer]  # (B, L, H)
        rows = states.inputs.frame_samples()  # (F,)
        at = states.answer_positions()[rows]  # (F,)
        asked = hidden[rows.to(hidden.device), at.clamp(min=0).to(hidden.device)]  # (F, H)
        q = self.query(asked.to(self.query.weight.dtype))  # (F, d)
        k = self.key(tokens)  # (F, N', d)
        logits = torch.einsum("fd,fnd->fn", q, k).float() / self.options.dim ** 0.5 + self.bias
        return logits, at >= 0

    def loss(self, states: AuxStates, samples: Sequence[Sample]) -> torch.Tensor:
        logits, asked = self.logits(states, samples)
        targets, valid = grounding_cover(samples, states.inputs.visual_grid, states.max_frames)
        valid = (valid & asked).to(logits.device)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        weight = torch.tensor(self.options.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits[valid], targets.to(logits)[valid], pos_weight=weight)


def _label_classes(labels: Sequence[str], context: AuxContext) -> dict[str, tuple[str, ...]]:
    """``{kind: classes}`` of the labelling kinds a loss names, or :class:`ConfigError` for one the data lack."""
    missing = [k for k in labels if k not in context.label_classes]
    if missing or not labels:
        raise ConfigError(f"labels {missing or list(labels)}: the data sources declare classes for "
                          f"{sorted(context.label_classes) or 'no label kind'}")
    return {k: tuple(context.label_classes[k]) for k in labels}


def _check_layer(layer: int, num_layers: int) -> None:
    if not 1 <= layer <= num_layers:
        raise ConfigError(f"layer must be in 1..{num_layers} (the LLM's blocks), got {layer}")


#: name -> auxiliary loss class (what ``stage.aux`` names)
AUX_LOSSES: dict[str, type[AuxLoss]] = {"focus": FocusLoss, "attr": AttributeLoss, "patch": PatchLoss,
                                        "words": WordLoss, "lookup": LookupLoss}


def parse_aux(raw: Mapping[str, Any], where: str = "stage.aux") -> dict[str, AuxOptions]:
    """Each named auxiliary loss's typed options.

    Raises:
        ConfigError: an unknown name (with the closest), or a bad option (the message names its path).
    """
    out = {}
    for name, options in raw.items():
        if name not in AUX_LOSSES:
            raise ConfigError(f"{where}: unknown auxiliary loss {name!r}{suggest(name, list(AUX_LOSSES))}; "
                              f"known: {', '.join(AUX_LOSSES)}")
        out[name] = from_dict(AUX_LOSSES[name].options_cls, options or {}, f"{where}.{name}")
    return out


def build_aux(raw: Mapping[str, Any], context: AuxContext) -> nn.ModuleDict:
    """The stage's auxiliary losses, in the order the stage names them (those of weight 0 are left out)."""
    losses = {}
    for name, options in parse_aux(raw).items():
        if options.weight:
            try:
                losses[name] = AUX_LOSSES[name](options, context)
            except ConfigError as exc:
                raise ConfigError(f"stage.aux.{name}: {exc}") from exc
    return nn.ModuleDict(losses)
