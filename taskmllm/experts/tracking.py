"""Tracking expert: a box and a visibility score per frame of a video from one task query.

The target is named by the query state (a ``<ref>`` phrase read by the LLM) and optionally by a box in the
prompt, which is embedded (SAM positional encoding of its two corners + learned corner embeddings) and added
to the query; calls without a prompt box add a learned "no box" embedding instead. Each frame gets a copy of
the K projected query tokens plus a sinusoidal frame-time encoding; ``CausalFrameLayer`` blocks let them
cross-attend to their frame's patches and attend causally to earlier frames' states (memory). A box head
(normalized xyxy) and a visibility logit read the mean of the K tokens per frame.
Loss: ``5 * L1 + 2 * (1 - GIoU)`` on visible frames and BCE on visibility over all frames.
With ``box_head="mlp"`` (the default) the box is regressed from that per-frame state alone; with
``box_head="localizing"`` the state scores its frame's projected patches (plus the grid positional encoding)
and the box is centered where that heatmap points (:class:`~taskmllm.experts.common.LocalizingBoxHead`), and
visible frames add a heatmap cross-entropy towards the patch holding the target box's center (``track_heat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.errors import InputError, TargetError
from taskmllm.experts.base import (DecoderOptions, ExpertPrompt, ExpertResult, ExpertSpec, TaskTarget,
                                   VisionFeatures, as_tensor, check_widths, zero_terms)
from taskmllm.experts.boxes import elementwise_generalized_box_iou
from taskmllm.experts.canvas import Canvas, Color
from taskmllm.experts.common import (BoxHead, DecoderExpert, LocalizingBoxHead,
                                     check_box_head, embedding_rows, heatmap_loss)
from taskmllm.experts.temporal import CausalFrameLayer, frame_time_encoding


@dataclass
class TrackingOptions(DecoderOptions):
    """Options of :class:`TrackingExpert` (``ExpertSpec.options``).

    Attributes:
        dim, depth, num_heads, mlp_dim: the stack of :class:`CausalFrameLayer`.
        l1_weight, giou_weight, vis_weight: loss weights.
        visibility_threshold: probability above which :meth:`TrackingExpert.postprocess` calls a frame visible.
        box_head: ``mlp`` (each frame's box regressed from its pooled state) or ``localizing`` (each frame's
            box centered where the pooled state's heatmap over that frame's patches points,
            :class:`LocalizingBoxHead`); one of :data:`~taskmllm.experts.common.BOX_HEADS`.
        heat_weight: weight of the heatmap cross-entropy on visible frames (``localizing`` only).
    """

    l1_weight: float = 5.0
    giou_weight: float = 2.0
    vis_weight: float = 1.0
    visibility_threshold: float = 0.5
    box_head: str = "mlp"
    heat_weight: float = 1.0

    def __post_init__(self) -> None:
        check_widths("TrackingOptions", self.dim, self.num_heads, self.depth, multiple=2, mlp_dim=self.mlp_dim)
        check_box_head("TrackingOptions", self.box_head)


@dataclass
class TrackingOutput:
    """Attributes:
    boxes: ``(M, T, 4)`` normalized xyxy per frame.
    visibility_logits: ``(M, T)`` logits that the target is visible in the frame.
    heat: ``(M, T, h*w)`` patch heatmap logits of each frame (``localizing`` box head), else None.
    grid: the ``(h, w)`` patch grid of ``heat``.
    """

    boxes: torch.Tensor
    visibility_logits: torch.Tensor
    heat: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None


@dataclass
class TrackResult(ExpertResult):
    """Attributes: boxes ``(T, 4)`` float32 pixel xyxy at the original size; visible ``(T,)`` bool;
    scores ``(T,)`` visibility probabilities."""

    boxes: np.ndarray
    visible: np.ndarray
    scores: np.ndarray

    def draw(self, canvas: Canvas, frame: Optional[int], label: str, color: Color, threshold: float) -> None:
        """The frame's box, labelled with its visibility, when that is at least ``threshold`` (a video only)."""
        if frame is not None and frame < len(self.boxes) and float(self.scores[frame]) >= threshold:
            canvas.box(tuple(self.boxes[frame]), f"{label} {float(self.scores[frame]):.2f}", color)

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": np.round(self.boxes, 2).tolist(), "visibility": np.round(self.scores, 4).tolist()}


class TrackingExpert(DecoderExpert, name="track", num_queries=1, options=TrackingOptions, video=True):
    """``<track>``: per-frame boxes and visibility of one target over a video (K = 1 by default)."""

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)  # query and feature projections, positional encoding
        opts: TrackingOptions = self.options  # type: ignore[assignment]
        d = opts.dim
        self.box_corner_embed = nn.Embedding(2, d)
        self.box_proj = nn.Linear(2 * d, d)
        self.no_box_embed = nn.Embedding(1, d)
        self.layers = nn.ModuleList(CausalFrameLayer(d, opts.num_heads, opts.mlp_dim) for _ in range(opts.depth))
        self.norm = nn.LayerNorm(d)
        self.box_head = BoxHead(d) if opts.box_head == "mlp" else LocalizingBoxHead(d)
        self.vis_head = nn.Linear(d, 1)

    def embed_prompt_boxes(self, prompts: Optional[Sequence[ExpertPrompt]], m: int) -> torch.Tensor:
        """``(M, D)``: the embedding of each call's prompt box, or the no-box embedding."""
        no_box = embedding_rows(self.no_box_embed)[0]
        if prompts is None:
            return no_box[None].expand(m, -1)
        out = []
        for i, prompt in enumerate(prompts):
            if prompt is None or prompt.box is None:
                out.append(no_box)
                continue
            box = as_tensor(prompt.box, torch.float32, no_box.device)
            if box.shape != (4,) or not torch.isfinite(box).all():
                raise InputError(f"track: prompt {i} box must be 4 finite normalized x1, y1, x2, y2, got {box.tolist()}")
            corners = self.pe.points(box.reshape(2, 2)).to(no_box.dtype) + embedding_rows(self.box_corner_embed)  # (2, D)
            out.append(self.box_proj(corners.reshape(-1)))
        return torch.stack(out)

    def forward(self, query_states: torch.Tensor, features: VisionFeatures,
                prompts: Optional[Sequence[ExpertPrompt]] = None) -> TrackingOutput:
        """``query_states (M, K, H)``, ``features (M, T, h*w, C)``, optional prompt boxes -> :class:`TrackingOutput`
        (with ``heat`` and ``grid`` for the ``localizing`` box head)."""
        self.check_inputs(query_states, features, prompts, single_frame=False)
        dtype = self.no_box_embed.weight.dtype
        m, t = features.features.shape[:2]
        frames = self.feature_proj(features.features.to(dtype), features.grid, features.frame_context(False),
                                   features.context_grid)  # (M, T, N, D)
        frame_pe = self.pe.grid(features.grid).to(dtype)  # (N, D)
        queries = self.query_proj(query_states.to(dtype)) + self.embed_prompt_boxes(prompts, m)[:, None]  # (M, K, D)
        time = frame_time_encoding(t, queries.shape[-1], queries.device, dtype)  # (T, D)
        states = queries[:, None] + time[None, :, None]  # (M, T, K, D)
        for layer in self.layers:
            states = layer(states, frames, frame_pe)
        pooled = self.norm(states).mean(dim=2)  # (M, T, D)
        visibility_logits = self.vis_head(pooled)[..., 0]
        if isinstance(self.box_head, BoxHead):
            return TrackingOutput(boxes=self.box_head(pooled), visibility_logits=visibility_logits)
        # the layers read the patches without updating them: the head scores the projected frames + PE
        boxes, heat = self.box_head(pooled[:, :, None], frames + frame_pe, features.grid)  # (M, T, 1, 4), (M, T, 1, N)
        return TrackingOutput(boxes=boxes[:, :, 0], visibility_logits=visibility_logits, heat=heat[:, :, 0],
                              grid=tuple(features.grid))

    def _target_track(self, target: TaskTarget, index: int, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if target.boxes is None:
            raise TargetError(f"track: target {index} has no boxes")
        boxes = as_tensor(target.boxes, torch.float32, device)
        if boxes.shape != (frames, 4):
            raise TargetError(f"track: target {index} boxes must be (T={frames}, 4), got {tuple(boxes.shape)}")
        if target.visible is None:
            visible = torch.ones(frames, dtype=torch.bool, device=device)
        else:
            visible = as_tensor(target.visible, torch.bool, device)
            if visible.shape != (frames,):
                raise TargetError(f"track: target {index} visible must be (T={frames},), got {tuple(visible.shape)}")
        vis_boxes = boxes[visible]
        if not torch.isfinite(vis_boxes).all() or (vis_boxes[:, 2:] < vis_boxes[:, :2]).any():
            raise TargetError(f"track: target {index} boxes of visible frames must be finite xyxy with x2 >= x1")
        return boxes, visible

    def loss(self, outputs: TrackingOutput, targets: Sequence[TaskTarget]) -> dict[str, torch.Tensor]:
        """Terms ``track_l1``, ``track_giou`` (visible frames) and ``track_vis`` (all frames), weighted; plus
        ``track_heat`` (visible frames) when the outputs carry a heatmap."""
        if not isinstance(outputs, TrackingOutput):
            raise TargetError(f"track: loss needs a TrackingOutput, got {type(outputs).__name__}")
        m, t = outputs.visibility_logits.shape
        self.check_targets(targets, m)
        if m == 0:
            names = ("track_l1", "track_giou", "track_vis") + (("track_heat",) if outputs.heat is not None else ())
            return zero_terms(names, outputs.boxes)
        opts: TrackingOptions = self.options  # type: ignore[assignment]
        pred = outputs.boxes.float()
        # targets are checked and indexed on the host (nothing waits for the device), then moved
        pairs = [self._target_track(target, i, t, torch.device("cpu")) for i, target in enumerate(targets)]
        boxes = torch.stack([b for b, _ in pairs]).to(pred.device, non_blocking=True)
        visible = torch.stack([v for _, v in pairs])
        num = max(int(visible.sum()), 1)
        vis_pred, vis_tgt = pred[visible], boxes[visible]
        l1 = (vis_pred - vis_tgt).abs().sum() / num
        giou = (1 - elementwise_generalized_box_iou(vis_pred, vis_tgt)).sum() / num
        vis = F.binary_cross_entropy_with_logits(outputs.visibility_logits.float(),
                                                 visible.to(pred.device, non_blocking=True).float())
        terms = {
            "track_l1": opts.l1_weight * l1,
            "track_giou": opts.giou_weight * giou,
            "track_vis": opts.vis_weight * vis,
        }
        if outputs.heat is not None:
            terms["track_heat"] = opts.heat_weight * heatmap_loss(outputs.heat[visible], vis_tgt, outputs.grid)
        return terms

    @torch.no_grad()
    def postprocess(self, outputs: TrackingOutput, sizes: Sequence[tuple[int, int]],
                    score_threshold: Optional[float] = None) -> list[TrackResult]:
        """Per-frame boxes in pixels of each original ``(H, W)`` with visibility; one :class:`TrackResult` per call
        (``score_threshold`` is ignored: visibility has its own option)."""
        if len(sizes) != outputs.boxes.shape[0]:
            raise InputError(f"track: {outputs.boxes.shape[0]} outputs but {len(sizes)} sizes")
        threshold = self.options.visibility_threshold  # type: ignore[attr-defined]
        results = []
        for boxes, logits, (height, width) in zip(outputs.boxes.float(), outputs.visibility_logits.float(), sizes):
            scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
            scores = logits.sigmoid()
            results.append(
                TrackResult(
                    boxes=(boxes.clamp(0, 1) * scale).cpu().numpy(),
                    visible=(scores > threshold).cpu().numpy(),
                    scores=scores.cpu().numpy(),
                )
            )
        return results
