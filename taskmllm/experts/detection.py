"""Detection expert: set prediction of up to K boxes with objectness from K task queries (DETR-style).

The K projected query states (plus a learned per-slot embedding that keeps the slots distinct) attend to
the projected patch features with SAM's positional encoding through segment_anything's
``TwoWayTransformer`` (query self-attention, query->image and image->query cross-attention). Each slot
predicts a normalized xyxy box and an objectness logit. Training matches slots to target boxes with the
Hungarian algorithm (scipy) on DETR costs; the loss is ``5 * L1 + 2 * (1 - GIoU)`` over matched slots
(normalized by the number of target boxes) plus a BCE on objectness (matched slots 1, the others 0).
With ``box_head="localizing"`` each slot's box is centered where its heatmap over the decoded patches points
(:class:`~taskmllm.experts.common.LocalizingBoxHead`) and matched slots add a heatmap cross-entropy towards
the patch holding their target's center (``det_heat``).

Scores. DETR's objectness (``score_head="slot"``) is a linear head on each slot's state; on ShapesWorld it
stayed at its prior (``det_obj`` ~0.40 through training, scores within a question spread by 0.03), so COCO AP
ranked well-placed and stray boxes alike (the shipped tiny: AP50 0.105, the same boxes ranked by their IoU 0.36).
``score_head="center"`` adds CenterNet's dense center map (Zhou et al., *Objects as Points*, 2019): a logit per
decoded patch — the patches have attended to the phrase's queries — trained with RetinaNet's sigmoid focal loss
towards the patches holding a target center (``det_center``, every patch labelled, normalized by the number of
targets); a slot's score logit is its objectness plus the center map under its heatmap (``softmax(heat) @
center``). Needs ``box_head="localizing"``. ``score_head="match"`` makes that map the phrase's: each patch's logit
is the dot product of the decoded patch with the call's mean projected query state (SAM's and LISA's
mask-logit form, ``<patch, W q> / sqrt(D) + b``), so a patch scores where what the query names is, not where any
object is — same loss, same slot scores. On the shipped smol's frozen query states, which hold the phrase (a
linear probe reads its colour and shape at 0.96-1.00), a fresh expert's slots box the referred object in 74% of
REC calls, but ``center`` ranks it first in 32% (an expert given no phrase: 31%); ``match`` on the states
standardized per dimension (``query_norm="batch"``) in 47% after 2,000 steps (a learned encoding of the phrase
itself: 45%). Either change alone: 32-33% (``bench/expert_probe.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from taskmllm.errors import ConfigError, InputError, TargetError
from taskmllm.experts.base import (DecoderOptions, ExpertPrompt, ExpertResult, ExpertSpec, TaskTarget,
                                   VisionFeatures, as_tensor, check_widths, zero_terms)
from taskmllm.experts.boxes import elementwise_generalized_box_iou, nms
from taskmllm.experts.canvas import Canvas, Color
from taskmllm.experts.common import (BoxHead, DecoderExpert, LocalizingBoxHead, QueryMatch,
                                     center_cells, check_box_head, embedding_rows, frame_embedding, heatmap_loss)
from taskmllm.experts.matching import HungarianMatcher, MatchCosts


SCORE_HEADS = ("slot", "center", "match")
"""How :class:`DetectionExpert` scores its slots (``DetectionOptions.score_head``; see the module doc)."""


@dataclass
class DetectionOptions(DecoderOptions):
    """Options of :class:`DetectionExpert` (``ExpertSpec.options``).

    Attributes:
        dim, depth, num_heads, mlp_dim: the TwoWayTransformer decoder.
        l1_weight, giou_weight, obj_weight: loss weights (DETR: 5, 2, 1).
        cost_l1, cost_giou, cost_obj: matching cost weights (DETR: 5, 2, 1).
        score_threshold: objectness probability above which :meth:`DetectionExpert.postprocess` keeps a box.
        box_head: ``mlp`` (DETR: each slot's box regressed from its state) or ``localizing`` (each slot's
            box centered where its patch heatmap points, :class:`LocalizingBoxHead`; learns far faster from
            little data, see ``bench/expert_probe.py``).
        heat_weight: weight of the heatmap cross-entropy of matched slots (``localizing`` only).
        score_head: ``slot`` (DETR objectness from each slot's state), ``center`` (plus CenterNet's dense
            center map under the slot's heatmap) or ``match`` (that map as the patches' match with the query);
            ``center`` and ``match`` need ``localizing`` (see the module doc).
        center_weight: weight of the center map's focal loss (``center`` and ``match``).
        nms_iou: in :meth:`DetectionExpert.postprocess`, drop a box whose IoU with a higher-scoring kept box
            exceeds this (greedy NMS); 0 keeps every slot (DETR's set prediction has no NMS). Slots whose
            heatmaps point at the same object give duplicates that NMS removes.
    """

    l1_weight: float = 5.0
    giou_weight: float = 2.0
    obj_weight: float = 1.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    cost_obj: float = 1.0
    score_threshold: float = 0.5
    box_head: str = "mlp"
    heat_weight: float = 1.0
    score_head: str = "slot"
    center_weight: float = 1.0
    nms_iou: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ConfigError(f"DetectionOptions.nms_iou must be in [0, 1] (0 = no NMS), got {self.nms_iou}")
        check_widths("DetectionOptions", self.dim, self.num_heads, self.depth, multiple=2, mlp_dim=self.mlp_dim)
        check_box_head("DetectionOptions", self.box_head)
        if self.score_head not in SCORE_HEADS:
            raise ConfigError(f"DetectionOptions.score_head must be one of {SCORE_HEADS}, got {self.score_head!r}")
        if self.score_head != "slot" and self.box_head != "localizing":
            raise ConfigError(f"DetectionOptions.score_head={self.score_head!r} reads the slots' heatmaps: it needs "
                              f"box_head='localizing', got {self.box_head!r}")


class PatchCenterHead(nn.Linear):
    """CenterNet's center map (``score_head="center"``): a linear logit per decoded patch; the query is not read.
    ``patches (M, N, D)``, ``queries (M, K, D)`` -> ``(M, N)`` logits (the call signature of every center head)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1)

    def forward(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return super().forward(patches)[..., 0]


class MatchCenterHead(QueryMatch):
    """The center map as the decoded patches' match with the call's query (``score_head="match"``, a
    :class:`~taskmllm.experts.common.QueryMatch`); ``patches (M, N, D)``, ``queries (M, K, D)`` -> ``(M, N)``."""


@dataclass
class DetectionOutput:
    """Attributes:
    boxes: ``(M, K, 4)`` normalized xyxy, one per slot.
    logits: ``(M, K)`` objectness logits (``sigmoid`` gives the score).
    heat: ``(M, K, h*w)`` patch heatmap logits of each slot (``localizing`` box head), else None.
    grid: the ``(h, w)`` patch grid of ``heat``.
    center: ``(M, h*w)`` center-map logits (``score_head="center"``), else None.
    """

    boxes: torch.Tensor
    logits: torch.Tensor
    heat: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None
    center: Optional[torch.Tensor] = None


@dataclass
class DetectionResult(ExpertResult):
    """Attributes: boxes ``(n, 4)`` float32 pixel xyxy at the original size, scores ``(n,)``, best first."""

    boxes: np.ndarray
    scores: np.ndarray

    def draw(self, canvas: Canvas, frame: Optional[int], label: str, color: Color, threshold: float) -> None:
        """Each box scoring at least ``threshold``, labelled with its score (an image only)."""
        if frame is None:
            for box, score in zip(self.boxes, self.scores):
                if float(score) >= threshold:
                    canvas.box(tuple(box), f"{label} {float(score):.2f}", color)

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": np.round(self.boxes, 2).tolist(), "scores": np.round(self.scores, 4).tolist()}


def center_targets(boxes: Sequence[torch.Tensor], grid: tuple[int, int],
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """CenterNet's targets on a row-major ``(h, w)`` grid: per call ``(n, 4)`` normalized xyxy boxes -> ``(M, h*w)``
    with 1 at every patch holding a box center, 0 elsewhere; on ``device`` (default: the boxes' device)."""
    if device is None:
        device = boxes[0].device if len(boxes) else torch.device("cpu")
    out = torch.zeros(len(boxes), grid[0] * grid[1], device=device)
    for i, b in enumerate(boxes):
        if b.shape[0]:
            out[i, center_cells(b.to(device), grid)] = 1.0
    return out


class DetectionExpert(DecoderExpert, name="det", num_queries=8, options=DetectionOptions):
    """``<det>``: up to K boxes with scores per call (K = num_queries, default 8)."""

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)  # query and feature projections, positional encoding
        opts: DetectionOptions = self.options  # type: ignore[assignment]
        d = opts.dim
        self.slot_embed = nn.Embedding(spec.num_queries, d)
        self.decoder = TwoWayTransformer(depth=opts.depth, embedding_dim=d, num_heads=opts.num_heads, mlp_dim=opts.mlp_dim)
        self.box_head = BoxHead(d) if opts.box_head == "mlp" else LocalizingBoxHead(d)
        self.obj_head = nn.Linear(d, 1)
        self.center_head: Optional[nn.Module] = None
        if opts.score_head == "center":
            self.center_head = PatchCenterHead(d)
        elif opts.score_head == "match":
            self.center_head = MatchCenterHead(d)
        if self.center_head is not None:  # RetinaNet's prior init: p = 0.01 everywhere, so the focal loss of the
            nn.init.constant_(self.center_head.bias, -math.log(99.0))  # many empty cells starts small
        self.matcher = HungarianMatcher(MatchCosts(objectness=opts.cost_obj, l1=opts.cost_l1, giou=opts.cost_giou))

    def forward(self, query_states: torch.Tensor, features: VisionFeatures,
                prompts: Optional[Sequence[ExpertPrompt]] = None) -> DetectionOutput:
        """``query_states (M, K, H)``, ``features (M, 1, h*w, C)`` -> :class:`DetectionOutput`."""
        self.check_inputs(query_states, features, prompts, single_frame=True)
        dtype = self.slot_embed.weight.dtype
        h, w = features.grid
        image, image_pe = frame_embedding(self.feature_proj, self.pe, features, dtype)  # (M, D, h, w), (1, D, h, w)
        image_pe = image_pe.expand(image.shape[0], -1, -1, -1)
        phrase = self.query_proj(query_states.to(dtype))  # (M, K, D)
        hs, patches = self.decoder(image, image_pe, phrase + embedding_rows(self.slot_embed)[None])  # (M, K, D), (M, h*w, D)
        logits = self.obj_head(hs)[..., 0]
        if isinstance(self.box_head, BoxHead):
            return DetectionOutput(boxes=self.box_head(hs), logits=logits)
        patches = patches + image_pe.flatten(2).transpose(1, 2)  # (M, h*w, D)
        boxes, heat = self.box_head(hs, patches, (h, w))
        center = None
        if self.center_head is not None:
            center = self.center_head(patches, phrase)  # (M, h*w)
            logits = logits + (heat.softmax(-1) @ center[..., None])[..., 0]  # + the center map under each slot
        return DetectionOutput(boxes=boxes, logits=logits, heat=heat, grid=(h, w), center=center)

    def _target_boxes(self, target: TaskTarget, index: int, device: torch.device) -> torch.Tensor:
        if target.boxes is None:
            raise TargetError(f"det: target {index} has no boxes (use an empty (0, 4) array for none)")
        boxes = as_tensor(target.boxes, torch.float32, device)
        if boxes.numel() == 0:
            return boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise TargetError(f"det: target {index} boxes must be (n, 4) normalized xyxy, got {tuple(boxes.shape)}")
        if boxes.shape[0] > self.num_queries:
            raise TargetError(
                f"det: target {index} has {boxes.shape[0]} boxes but the expert predicts at most "
                f"{self.num_queries} (num_queries)"
            )
        if not torch.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
            raise TargetError(f"det: target {index} boxes must be finite xyxy with x2 >= x1 and y2 >= y1")
        return boxes

    def loss(self, outputs: DetectionOutput, targets: Sequence[TaskTarget]) -> dict[str, torch.Tensor]:
        """Terms ``det_l1``, ``det_giou``, ``det_obj`` (weighted) after Hungarian matching per call."""
        if not isinstance(outputs, DetectionOutput):
            raise TargetError(f"det: loss needs a DetectionOutput, got {type(outputs).__name__}")
        self.check_targets(targets, outputs.boxes.shape[0])
        if outputs.boxes.shape[0] == 0:
            names = ("det_l1", "det_giou", "det_obj") + (("det_heat",) if outputs.heat is not None else ()) + (
                ("det_center",) if outputs.center is not None else ())
            return zero_terms(names, outputs.boxes)
        opts: DetectionOptions = self.options  # type: ignore[assignment]
        boxes, logits = outputs.boxes.float(), outputs.logits.float()
        obj_target = torch.zeros_like(logits)
        matched_pred, matched_tgt, matched_heat, all_tgt = [], [], [], []
        for i, target in enumerate(targets):
            host = self._target_boxes(target, i, torch.device("cpu"))  # checked on the host, then moved
            all_tgt.append(host)
            tgt = host.to(boxes.device, non_blocking=True)
            pred_idx, tgt_idx = self.matcher.match(boxes[i].detach(), logits[i].detach(), tgt)
            obj_target[i, pred_idx] = 1.0
            matched_pred.append(boxes[i, pred_idx])
            matched_tgt.append(tgt[tgt_idx])
            if outputs.heat is not None:
                matched_heat.append(outputs.heat[i, pred_idx])
        pred = torch.cat(matched_pred)
        tgt = torch.cat(matched_tgt)
        num = max(pred.shape[0], 1)
        l1 = (pred - tgt).abs().sum() / num
        giou = (1 - elementwise_generalized_box_iou(pred, tgt)).sum() / num
        obj = F.binary_cross_entropy_with_logits(logits, obj_target)
        terms = {
            "det_l1": opts.l1_weight * l1,
            "det_giou": opts.giou_weight * giou,
            "det_obj": opts.obj_weight * obj,
        }
        if outputs.heat is not None:
            terms["det_heat"] = opts.heat_weight * heatmap_loss(torch.cat(matched_heat), tgt, outputs.grid)
        if outputs.center is not None:
            centers = center_targets(all_tgt, outputs.grid, outputs.center.device)  # (M, h*w) in {0, 1}
            count = centers.sum().clamp(min=1.0)  # stays on the device: no host sync
            focal = sigmoid_focal_loss(outputs.center.float(), centers, reduction="sum")
            terms["det_center"] = opts.center_weight * focal / count
        return terms

    @torch.no_grad()
    def postprocess(
        self,
        outputs: DetectionOutput,
        sizes: Sequence[tuple[int, int]],
        score_threshold: Optional[float] = None,
    ) -> list[DetectionResult]:
        """Boxes scoring above the threshold, in pixels of each original ``(H, W)``, sorted by score (and
        de-duplicated by NMS when ``nms_iou`` > 0)."""
        if len(sizes) != outputs.boxes.shape[0]:
            raise InputError(f"det: {outputs.boxes.shape[0]} outputs but {len(sizes)} sizes")
        threshold = self.options.score_threshold if score_threshold is None else score_threshold  # type: ignore[attr-defined]
        nms_iou = self.options.nms_iou  # type: ignore[attr-defined]
        results = []
        for boxes, logits, (height, width) in zip(outputs.boxes.float(), outputs.logits.float(), sizes):
            scores = logits.sigmoid()
            keep = torch.nonzero(scores > threshold).flatten()
            keep = keep[torch.argsort(scores[keep], descending=True)]
            if nms_iou > 0 and keep.numel() > 1:
                keep = keep[nms(boxes[keep], scores[keep], nms_iou)]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
            pixels = boxes[keep].clamp(0, 1) * scale
            results.append(DetectionResult(boxes=pixels.cpu().numpy(), scores=scores[keep].cpu().numpy()))
        return results
