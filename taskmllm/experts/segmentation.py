"""Segmentation expert: segment_anything's ``MaskDecoder`` prompted by the projected task queries (LISA / TPO).

The image embedding is the vision tower's patch grid projected to the decoder width; the K query states,
projected by LISA's ``Linear(H,H) -> ReLU -> Linear(H,D)``, are the sparse prompt embeddings; the dense
prompt is a learned "no mask" embedding (as in SAM without a mask prompt); positions come from SAM's
``PositionEmbeddingRandom``. The decoder predicts one mask per call at 4x the patch grid, upsampled
bilinearly to the model input for the loss and to each original image size in :meth:`postprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch import nn

from taskmllm.errors import InputError, TargetError
from taskmllm.experts.base import (DecoderOptions, ExpertPrompt, ExpertResult, ExpertSpec, TaskTarget,
                                   VisionFeatures, as_tensor, check_widths, zero_terms)
from taskmllm.experts.canvas import Canvas, Color
from taskmllm.experts.common import DecoderExpert, QueryMatch, embedding_rows, frame_embedding


@dataclass
class SegmentationOptions(DecoderOptions):
    """Options of :class:`SegmentationExpert` (``ExpertSpec.options``).

    Attributes:
        dim: decoder width D (SAM uses 256; 64 trains fast on a CPU). Must be divisible by 8 and num_heads.
        depth: TwoWayTransformer layers.
        num_heads: attention heads.
        mlp_dim: MLP width inside the transformer.
        bce_weight, dice_weight: LISA's 2 * BCE + 0.5 * Dice.
        iou_weight: weight of the MSE between the predicted mask quality and the IoU actually reached.
        mask_threshold: logit threshold that binarizes masks in :meth:`SegmentationExpert.postprocess`.
        detail: add a learned stride-4 encoding of the frame's pixels (:class:`DetailStem`) to the decoder's
            upscaled mask embedding, so mask edges are not limited to the patch grid (the low-level skip of
            DeepLabv3+, HQ-SAM's early-feature fusion). Needs ``VisionFeatures.pixels``.
        query_match: add to SAM's mask logits each decoded patch's match with the projected query
            (:class:`~taskmllm.experts.common.QueryMatch`, CRIS's text-to-pixel contrast; det's ``score_head:
            match``), upsampled bilinearly from the patch grid: a direct path from the phrase to the patches it
            names, beside the mask token's. Starts at zero, so a checkpoint gaining it predicts the same masks.
    """

    bce_weight: float = 2.0
    dice_weight: float = 0.5
    iou_weight: float = 1.0
    mask_threshold: float = 0.0
    detail: bool = False
    query_match: bool = False

    def __post_init__(self) -> None:
        check_widths("SegmentationOptions", self.dim, self.num_heads, self.depth, multiple=8, mlp_dim=self.mlp_dim)


@dataclass
class SegmentationOutput:
    """Attributes:
    mask_logits: ``(M, 4h, 4w)`` low-resolution mask logits, one mask per call.
    iou_scores: ``(M,)`` predicted mask quality in [0, 1] (trained towards the IoU reached).
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor


@dataclass
class SegmentationResult(ExpertResult):
    """Attributes: mask ``(H, W)`` bool numpy array at the original size; score the predicted quality."""

    mask: np.ndarray
    score: float

    def draw(self, canvas: Canvas, frame: Optional[int], label: str, color: Color, threshold: float) -> None:
        """The mask blended in (an image only: a mask is of one frame)."""
        if frame is None:
            canvas.fill(self.mask, color, label)

    def to_dict(self) -> dict[str, Any]:
        """The mask as COCO RLE (pycocotools)."""
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"mask_rle": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over masks of ``1 - (2 Σ p t + s) / (Σ p + Σ t + s)``; ``(M, H, W)`` logits and soft targets."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


class DetailStem(nn.Module):
    """Pixels ``(M, 3, S, S)`` -> ``(M, D/8, S/4, S/4)``: two stride-2 3 x 3 convolutions and a 1 x 1 one, the
    fine-grained (edge, color) signal a stride-16 patch grid lacks, in the width of SAM's upscaled mask
    embedding. Its last layer starts at zero, so a checkpoint gaining it predicts the same masks at first."""

    def __init__(self, out_dim: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, out_dim, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.net(pixels)  # (M, D/8, S/4, S/4)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def batched_predict_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    detail: Optional[DetailStem] = None,
    pixels: Optional[torch.Tensor] = None,
    match: Optional[QueryMatch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for B images with one prompt set each, in one batched pass.

    SAM's decoder takes one image and expands it over B prompt sets (``repeat_interleave``); our B calls each
    have their own image. This runs the same modules in the same order on ``image_embeddings (B, D, h, w)``,
    ``image_pe (1, D, h, w)``, ``sparse_prompt_embeddings (B, K, D)``, ``dense_prompt_embeddings (1|B, D, h, w)``
    and returns the mask token's masks ``(B, 1, 4h, 4w)`` and quality ``(B, 1)`` — equal to calling
    ``decoder(image_embeddings[i:i+1], ..., multimask_output=False)`` per call (tested). With ``detail`` and
    ``pixels (B, 3, S, S)``, ``detail(pixels)`` is added to the upscaled embedding before the mask product; with ``match``, the decoded
    patches' match with the mean sparse prompt, upsampled bilinearly, is added to the masks.
    """
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([embedding_rows(decoder.iou_token), embedding_rows(decoder.mask_tokens)], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_token_out = hs[:, 1, :]  # the single-mask output (multimask_output=False)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, D/8, 4h, 4w)
    if detail is not None:
        upscaled = upscaled + detail(pixels.to(upscaled.dtype), tuple(upscaled.shape[-2:]))
    hyper_in = decoder.output_hypernetworks_mlps[0](mask_token_out)[:, None]  # (B, 1, D/8)
    _, c8, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c8, uh * uw)).reshape(b, 1, uh, uw)
    if match is not None:
        patch_logits = match(src, sparse_prompt_embeddings).reshape(b, 1, h, w)  # src: (B, h*w, D) decoded patches
        masks = masks + F.interpolate(patch_logits, size=(uh, uw), mode="bilinear", align_corners=False)
    iou_pred = decoder.iou_prediction_head(iou_token_out)[:, :1]
    return masks, iou_pred


class SegmentationExpert(DecoderExpert, name="seg", num_queries=1, options=SegmentationOptions):
    """``<seg>``: one mask per call from K query states (LISA/TPO use K = 1)."""

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)  # query and feature projections, positional encoding
        opts: SegmentationOptions = self.options  # type: ignore[assignment]
        d = opts.dim
        self.no_mask_embed = nn.Embedding(1, d)
        self.mask_decoder = MaskDecoder(
            transformer_dim=d,
            transformer=TwoWayTransformer(depth=opts.depth, embedding_dim=d, num_heads=opts.num_heads, mlp_dim=opts.mlp_dim),
            num_multimask_outputs=0,  # one mask, as LISA uses (multimask_output=False)
            iou_head_depth=3,
            iou_head_hidden_dim=d,
        )
        self.detail = DetailStem(d // 8) if opts.detail else None
        self.match = QueryMatch(d, zero_init=True) if opts.query_match else None

    @property
    def reads_pixels(self) -> bool:
        return self.detail is not None

    def forward(self, query_states: torch.Tensor, features: VisionFeatures,
                prompts: Optional[Sequence[ExpertPrompt]] = None) -> SegmentationOutput:
        """``query_states (M, K, H)``, ``features (M, 1, h*w, C)`` -> :class:`SegmentationOutput`."""
        self.check_inputs(query_states, features, prompts, single_frame=True)
        dtype = self.no_mask_embed.weight.dtype
        h, w = features.grid
        d = self.no_mask_embed.embedding_dim
        image, image_pe = frame_embedding(self.feature_proj, self.pe, features, dtype)  # (M, D, h, w), (1, D, h, w)
        sparse = self.query_proj(query_states.to(dtype))  # (M, K, D)
        dense = embedding_rows(self.no_mask_embed).reshape(1, d, 1, 1).expand(1, d, h, w)
        pixels = None
        if self.detail is not None:
            if features.pixels is None:
                raise InputError("seg: this expert refines masks from the pixels (detail) but the call has none "
                                 "(VisionFeatures.pixels)")
            pixels = features.pixels[:, 0]  # (M, 3, S, S)
        masks, ious = batched_predict_masks(self.mask_decoder, image, image_pe, sparse, dense, self.detail, pixels,
                                            self.match)
        return SegmentationOutput(mask_logits=masks[:, 0], iou_scores=ious[:, 0].sigmoid())

    def _target_masks(self, targets: Sequence[TaskTarget], size: int, device: torch.device) -> torch.Tensor:
        out = []
        for i, target in enumerate(targets):
            if target.mask is None:
                raise TargetError(f"seg: target {i} has no mask")
            mask = as_tensor(target.mask, torch.float32, device)
            if mask.dim() != 2 or min(mask.shape) == 0:
                raise TargetError(f"seg: target {i} mask must be a non-empty (H, W) array, got {tuple(mask.shape)}")
            # Larger masks are averaged down (soft targets at the edges); smaller ones are upsampled exactly.
            mode = "area" if min(mask.shape) >= size else "nearest-exact"
            out.append(F.interpolate(mask[None, None], size=(size, size), mode=mode)[0, 0])
        return torch.stack(out)

    def loss(self, outputs: SegmentationOutput, targets: Sequence[TaskTarget]) -> dict[str, torch.Tensor]:
        """Terms ``seg_bce``, ``seg_dice``, ``seg_iou`` (weighted), computed at the model input size."""
        if not isinstance(outputs, SegmentationOutput):
            raise TargetError(f"seg: loss needs a SegmentationOutput, got {type(outputs).__name__}")
        self.check_targets(targets, outputs.mask_logits.shape[0])
        if outputs.mask_logits.shape[0] == 0:
            return zero_terms(("seg_bce", "seg_dice", "seg_iou"), outputs.mask_logits)
        opts: SegmentationOptions = self.options  # type: ignore[assignment]
        size = self.spec.image_size
        logits = F.interpolate(
            outputs.mask_logits[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
        )[:, 0]
        tgt = self._target_masks(targets, size, logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, tgt)
        dice = dice_loss(logits, tgt)
        with torch.no_grad():
            pred = logits > 0
            hard = tgt > 0.5
            inter = (pred & hard).flatten(1).sum(1).float()
            union = (pred | hard).flatten(1).sum(1).float()
            reached = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        iou = F.mse_loss(outputs.iou_scores.float(), reached)
        return {
            "seg_bce": opts.bce_weight * bce,
            "seg_dice": opts.dice_weight * dice,
            "seg_iou": opts.iou_weight * iou,
        }

    @torch.no_grad()
    def postprocess(self, outputs: SegmentationOutput, sizes: Sequence[tuple[int, int]],
                    score_threshold: Optional[float] = None) -> list[SegmentationResult]:
        """Masks upsampled to each original ``(H, W)`` and thresholded; one :class:`SegmentationResult` per call
        (masks carry no score: ``score_threshold`` is ignored)."""
        if len(sizes) != outputs.mask_logits.shape[0]:
            raise InputError(f"seg: {outputs.mask_logits.shape[0]} outputs but {len(sizes)} sizes")
        threshold = self.options.mask_threshold  # type: ignore[attr-defined]
        results = []
        for logits, score, (height, width) in zip(outputs.mask_logits, outputs.iou_scores, sizes):
            up = F.interpolate(logits[None, None].float(), size=(int(height), int(width)), mode="bilinear", align_corners=False)
            results.append(SegmentationResult(mask=(up[0, 0] > threshold).cpu().numpy(), score=float(score)))
        return results
