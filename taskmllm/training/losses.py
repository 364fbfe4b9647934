"""Weights and sums the training losses: LM cross-entropy, expert terms, and the training-only heads (per-patch,
focus and attribute losses; :func:`aux_heads` builds a stage's).

Experts already weight their own terms (e.g. ``2·L1 + GIoU/5``); a stage adds one weight per expert
(``stage.expert_weights[name]``, default 1) and one LM weight (``stage.lm_weight``). Expert term names are
prefixed with the expert's name (``seg_bce``, ``det_giou``), which is how a term finds its expert.

:class:`PatchHead` is the ``pretrain`` stage's direct supervision of a from-scratch vision tower (DESIGN,
"Measured before building"): a linear shape classifier and a linear color classifier on every vision token,
with per-patch labels from the ShapesWorld masks (the object covering most of the patch, else background).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.data.vocab import COLORS, SHAPES
from taskmllm.errors import ConfigError
from taskmllm.model.processor import sample_frames

if TYPE_CHECKING:
    from taskmllm.training.config import TrainConfig


def expert_of(term: str, experts: Sequence[str]) -> str:
    """The expert a loss term belongs to (longest name that prefixes ``term``)."""
    owners = [e for e in experts if term == e or term.startswith(e + "_")]
    if not owners:
        raise ConfigError(f"loss term {term!r} does not start with an expert name of {list(experts)}")
    return max(owners, key=len)


def check_expert_names(key: str, names: Iterable[str], experts: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if ``names`` (the value of stage option ``key``) has a name not in ``experts``."""
    unknown = sorted(set(names) - set(experts))
    if unknown:
        raise ConfigError(f"{key} names unknown experts {unknown}; experts: {list(experts)}")


def total_loss(lm_loss: torch.Tensor, expert_losses: Mapping[str, torch.Tensor], experts: Sequence[str],
               lm_weight: float = 1.0, expert_weights: Optional[Mapping[str, float]] = None,
               extra: Optional[Mapping[str, tuple[float, torch.Tensor]]] = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """``lm_weight·LM + Σ_e w_e·Σ terms_e + Σ w·extra`` and the weighted parts as floats for logging (the names in
    ``expert_weights`` are checked once before training, :func:`check_expert_names`)."""
    weights = dict(expert_weights or {})
    total = lm_loss * lm_weight
    parts = {"lm": float(lm_loss.detach())}
    for term, value in expert_losses.items():
        w = weights.get(expert_of(term, experts), 1.0)
        if w:
            total = total + w * value
        parts[term] = float(value.detach())
    for name, (w, value) in (extra or {}).items():
        if w:
            total = total + w * value
        parts[name] = float(value.detach())
    return total, parts


class PatchHead(nn.Module):
    """Linear shape and color classifiers over vision tokens ``(F, N, C)`` (index 0 = background)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.color = nn.Linear(width, len(COLORS) + 1)

    def loss(self, features: torch.Tensor, shape_labels: torch.Tensor, color_labels: torch.Tensor) -> torch.Tensor:
        feats = features.float()
        return (F.cross_entropy(self.shape(feats).flatten(0, 1), shape_labels.flatten())
                + F.cross_entropy(self.color(feats).flatten(0, 1), color_labels.flatten()))


def patch_labels(samples: Sequence, grid: tuple[int, int], max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``(F, gh*gw)`` shape and color labels of every frame of ``samples``, in the processor's order.

    A patch gets the class of the object covering the largest fraction of it when that fraction is >= 0.5,
    else 0 (background). Objects without masks or with unknown categories count as background.
    """
    shapes, colors = [], []
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    color_ids = {c: i + 1 for i, c in enumerate(COLORS)}
    for s in samples:
        if s.frames is None and s.image is None:
            continue
        n = s.frames.shape[0] if s.frames is not None else 1
        for t in sample_frames(list(range(n)), max_frames):
            masks, sid, cid = [], [], []
            for obj in s.objects:
                m = obj.masks[t] if obj.masks is not None else obj.mask
                if m is None:
                    continue
                masks.append(np.asarray(m, dtype=np.float32))
                sid.append(shape_ids.get(obj.category, 0))
                cid.append(color_ids.get(obj.color, 0))
            sl, cl = torch.zeros(grid[0] * grid[1], dtype=torch.long), torch.zeros(grid[0] * grid[1], dtype=torch.long)
            if masks:
                cover = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(masks))[None], grid)[0].flatten(1)
                frac, which = cover.max(0)
                keep = frac >= 0.5
                sl[keep] = torch.tensor(sid)[which[keep]]
                cl[keep] = torch.tensor(cid)[which[keep]]
            shapes.append(sl)
            colors.append(cl)
    if not shapes:
        return torch.zeros(0, grid[0] * grid[1], dtype=torch.long), torch.zeros(0, grid[0] * grid[1], dtype=torch.long)
    return torch.stack(shapes), torch.stack(colors)


def focus_targets(samples: Sequence, grid: tuple[int, int], max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token focus targets ``(F, gh*gw)`` in [0, 1] of every frame of ``samples`` (processor order) and
    ``(F,)`` bool: the frame's sample has a focus (:attr:`Sample.focus`; None = no target).

    A token's target is the fraction of it covered by the named objects' masks (area-pooled to ``grid``,
    the grid the LLM reads), doubled and capped at 1, so a token half covered counts as fully on it.
    """
    targets, valid = [], []
    for s in samples:
        if s.frames is None and s.image is None:
            continue
        n = s.frames.shape[0] if s.frames is not None else 1
        named = [o for o in s.objects if s.focus is not None and o.id in s.focus]
        for t in sample_frames(list(range(n)), max_frames):
            hit = np.zeros(s.hw, np.float32)
            for obj in named:
                m = obj.masks[t] if obj.masks is not None else obj.mask
                if m is not None:
                    hit = np.maximum(hit, np.asarray(m, dtype=np.float32))
            cover = F.adaptive_avg_pool2d(torch.from_numpy(hit)[None, None], grid).flatten()
            targets.append((2 * cover).clamp(max=1.0))
            valid.append(s.focus is not None)
    if not targets:
        return torch.zeros(0, grid[0] * grid[1]), torch.zeros(0, dtype=torch.bool)
    return torch.stack(targets), torch.tensor(valid)


class FocusHead(nn.Module):
    """Does this visual token show what the question names? A linear logit on the LLM's hidden state of every
    visual token after ``layer`` blocks, trained with BCE against :func:`focus_targets`.

    The visual tokens follow the question, so an LLM can mark the matching patches where they are and answer
    by attending to the marks; from the answer loss alone a from-scratch LLM does not find that lookup
    (``bench/vqa_probe.py``). ``pos_weight`` offsets the few object tokens among many background ones.
    """

    def __init__(self, hidden: int, layer: int, pos_weight: float = 10.0) -> None:
        super().__init__()
        if layer < 1:
            raise ConfigError(f"stage.focus_layer must be >= 1 (blocks before the focus is read), got {layer}")
        self.layer, self.pos_weight = layer, pos_weight
        self.linear = nn.Linear(hidden, 1)

    def loss(self, hidden: torch.Tensor, visual: torch.Tensor, targets: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
        """``hidden (B, L, H)``, ``visual (B, L)`` bool (the visual token positions, frame by frame),
        ``targets (F, N)``, ``valid (F,)`` -> mean BCE over the visual tokens of frames with a target."""
        logits = self.linear(hidden[visual].float()).squeeze(-1).view(targets.shape)  # (F, N)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        weight = torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits[valid], targets[valid].to(logits), pos_weight=weight)


class CaptureOutput:
    """``with CaptureOutput(module) as got: ...`` -> ``got.value`` is the module's last output (scoped hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.value, self._handle = module, None, None

    def __enter__(self) -> "CaptureOutput":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = output

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def aux_heads(joint: nn.Module, cfg: "TrainConfig") -> nn.ModuleDict:
    """The stage's training-only heads: ``patch_head`` (``stage.patch_weight``), ``focus_head``
    (``stage.focus_weight``), ``attr_head`` (``stage.attr_weight``). All take their labels from ShapesWorld's
    ground truth.

    Raises:
        ConfigError: a head is on and the data is not ShapesWorld, or ``focus_layer`` is out of range.
    """
    st = cfg.stage
    heads = {}
    for name, weight in (("patch_weight", st.patch_weight), ("focus_weight", st.focus_weight),
                         ("attr_weight", st.attr_weight)):
        if weight and cfg.data.source != "shapesworld":
            raise ConfigError(f"stage.{name} needs ShapesWorld data (its labels come from the scene's masks)")
    if st.patch_weight:
        heads["patch_head"] = PatchHead(joint.mllm.vision.width)
    if st.focus_weight or st.attr_weight:
        blocks = len(joint.mllm.llm.get_decoder().layers)
        if not 1 <= st.focus_layer <= blocks:
            raise ConfigError(f"stage.focus_layer must be in 1..{blocks} (the LLM's blocks), got {st.focus_layer}")
    if st.focus_weight:
        heads["focus_head"] = FocusHead(joint.mllm.hidden_size, st.focus_layer)
    if st.attr_weight:
        heads["attr_head"] = PatchHead(joint.mllm.hidden_size)
    return nn.ModuleDict(heads)
