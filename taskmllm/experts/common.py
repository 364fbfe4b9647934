"""Small building blocks shared by the experts: query and feature projections, positional encoding, box heads."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.experts.base import DecoderOptions, Expert, ExpertSpec, VisionFeatures
from taskmllm.experts.boxes import box_cxcywh_to_xyxy


BOX_HEADS = ("mlp", "localizing")
"""The box heads an expert's ``box_head`` option names: :class:`BoxHead` and :class:`LocalizingBoxHead`."""


def check_box_head(owner: str, box_head: str) -> None:
    """Raise :class:`~taskmllm.errors.ConfigError` unless ``box_head`` is one of :data:`BOX_HEADS`
    (``owner``: the options class, for the message)."""
    if box_head not in BOX_HEADS:
        raise ConfigError(f"{owner}.box_head must be one of {BOX_HEADS}, got {box_head!r}")


def embedding_rows(embedding: nn.Embedding) -> torch.Tensor:
    """Every row of ``embedding`` ``(n, D)``, read through the module's own forward (a lookup of rows 0..n-1: the
    weight itself). Engines that gather a module's parameters when it runs (DeepSpeed ZeRO-3) then see the read."""
    return embedding(torch.arange(embedding.num_embeddings, device=embedding.weight.device))


QUERY_NORMS = ("none", "batch")
"""How :class:`QueryProjection` normalizes the LLM's states first (``DecoderOptions.query_norm``)."""


class QueryProjection(nn.Module):
    """LISA's projection of LLM hidden states into the expert width: ``Linear(H,H) -> ReLU -> Linear(H,D)``.

    With ``norm="batch"`` each of the H dimensions is first standardized (``BatchNorm1d`` without affine: batch
    statistics in training, running ones in eval, and in training too when a batch has fewer than two states).
    A pretrained LLM's last states can keep most of their variance in a few dimensions (SmolLM2-135M: 60% in 8 of
    576), which the default-initialized projection then reads and little else.

    ``(..., H) -> (..., D)``.
    """

    def __init__(self, hidden_size: int, dim: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in QUERY_NORMS:
            raise ConfigError(f"query_norm must be one of {QUERY_NORMS}, got {norm!r}")
        self.norm = nn.BatchNorm1d(hidden_size, affine=False) if norm == "batch" else None
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, dim))

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            flat = query_states.reshape(-1, query_states.shape[-1])  # (N, H)
            batch_stats = self.training and flat.shape[0] > 1
            flat = F.batch_norm(flat, self.norm.running_mean, self.norm.running_var, training=batch_stats,
                                momentum=self.norm.momentum, eps=self.norm.eps)
            query_states = flat.reshape(query_states.shape)
        return self.net(query_states)


class QueryMatch(nn.Module):
    """Each patch's match with the call's query, SAM's and LISA's mask-logit form and CRIS's text-to-pixel
    contrast: ``<patch, W mean_k(q_k)> / sqrt(D) + b``; ``patches (M, N, D)``, ``queries (M, K, D)`` -> ``(M, N)``
    logits. A patch scores where what the query names is, not where any object is. ``zero_init`` starts ``W`` and
    ``b`` at zero (the map adds nothing until it trains: a checkpoint gaining it predicts as before)."""

    def __init__(self, dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(()))
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        key = self.proj(queries.mean(1))  # (M, D)
        return (patches @ key[..., None])[..., 0] / math.sqrt(patches.shape[-1]) + self.bias


class FeatureProjection(nn.Module):
    """Vision features into the expert width: ``Linear(C, D) -> LayerNorm(D)``; ``(..., N, C) -> (..., N, D)``.

    With ``context_dim`` > 0 it also adds ``Linear(H, D)`` of the LLM's visual-token states ``(..., N', H)``
    (on a coarser ``context_grid``; each token's projection is copied onto the patches it pools, nearest
    neighbour) before the norm.
    """

    def __init__(self, vision_dim: int, dim: int, context_dim: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, dim)
        self.context = nn.Linear(context_dim, dim) if context_dim else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, grid: Optional[tuple[int, int]] = None,
                context: Optional[torch.Tensor] = None,
                context_grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        x = self.proj(features)
        if self.context is None:
            return self.norm(x)
        if context is None or grid is None or context_grid is None:
            raise InputError("this expert reads the LLM's visual-token states (llm_context) but the call has "
                             "none (VisionFeatures.context / context_grid)")
        c = self.context(context.to(x.dtype))  # (..., N', D)
        lead, d = c.shape[:-2], c.shape[-1]
        c = c.reshape(-1, *context_grid, d).permute(0, 3, 1, 2)  # (B', D, h', w')
        c = F.interpolate(c, size=tuple(grid), mode="nearest")  # (B', D, h, w)
        return self.norm(x + c.flatten(2).transpose(1, 2).reshape(*lead, -1, d))


def frame_embedding(projection: FeatureProjection, pe: GridPositionalEncoding, features: VisionFeatures,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first frame of each call as a SAM decoder's image embedding: ``(M, D, h, w)`` projected features (with
    the LLM's visual-token states when the projection reads them) and the ``(1, D, h, w)`` grid positional
    encoding."""
    h, w = features.grid
    image = projection(features.features[:, 0].to(dtype), (h, w), features.frame_context(True),
                       features.context_grid)  # (M, N, D)
    m, d = image.shape[0], image.shape[-1]
    image_pe = pe.grid((h, w)).transpose(0, 1).reshape(1, d, h, w).to(dtype)
    return image.transpose(1, 2).reshape(m, d, h, w), image_pe


class GridPositionalEncoding(nn.Module):
    """segment_anything's random-Fourier positional encoding of a patch grid and of points, always computed in
    fp32 (the model may be cast to bf16: sin/cos of ``2 pi (2x - 1) @ G`` in bf16 loses the position, and SAM's
    own ``forward`` builds its grid in fp32 beside a cast matrix, which fails). Callers cast the result.

    ``grid(h, w) -> (h*w, D)`` row-major like the patch tokens; ``points((..., 2) normalized x, y) -> (..., D)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"positional encoding width must be even, got {dim}")
        self.pe = PositionEmbeddingRandom(dim // 2)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        device = self.pe.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # (h, w, 2) as SAM's x, y
        return self.points(coords).flatten(0, 1)  # (h*w, D)

    def points(self, coords: torch.Tensor) -> torch.Tensor:
        """SAM's ``_pe_encoding`` in fp32: ``(..., 2)`` in [0, 1] -> ``(..., D)`` fp32."""
        gaussian = self.pe.positional_encoding_gaussian_matrix.float()  # (2, D/2)
        projected = 2 * math.pi * ((2 * coords.float() - 1) @ gaussian)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


class BoxHead(nn.Module):
    """3-layer MLP to a sigmoid ``cx, cy, w, h`` box, returned as normalized xyxy; ``(..., D) -> (..., 4)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = MLP(dim, dim, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return box_cxcywh_to_xyxy(self.mlp(x).sigmoid())


def cell_centers(grid: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """Normalized ``(x, y)`` centers of a row-major ``(h, w)`` patch grid: ``(h*w, 2)``."""
    h, w = grid
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)


class LocalizingBoxHead(nn.Module):
    """A box from where a token looks (DAB/anchor-free style, for fast convergence on small data).

    Each token scores every patch (scaled dot product of projections): the softmax over patches is a
    heatmap whose expected cell center is the box center, refined by an offset of at most one cell; width
    and height come from an MLP on the token and the heatmap-weighted patch feature.

    ``tokens (..., K, D)``, ``patches (..., N, D)``, ``grid (h, w)`` with ``h*w = N`` ->
    ``boxes (..., K, 4)`` normalized xyxy and ``heat_logits (..., K, N)`` (targets for an auxiliary loss:
    :func:`heatmap_loss`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.mlp = MLP(2 * dim, dim, 4, 3)

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        d = tokens.shape[-1]
        heat = self.q(tokens) @ self.k(patches).transpose(-1, -2) / d ** 0.5  # (..., K, N)
        attn = heat.softmax(-1)
        center = attn @ cell_centers(grid, tokens.device, tokens.dtype)  # (..., K, 2)
        out = self.mlp(torch.cat([tokens, attn @ patches], -1))  # (..., K, 4)
        cell = torch.tensor([1.0 / grid[1], 1.0 / grid[0]], device=tokens.device, dtype=tokens.dtype)
        cxcy = center + out[..., :2].tanh() * cell
        return box_cxcywh_to_xyxy(torch.cat([cxcy, out[..., 2:].sigmoid()], -1)), heat


def heatmap_loss(heat_logits: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of each token's patch heatmap ``(n, N)`` against the patch holding the center of its
    target box ``(n, 4)`` normalized xyxy; 0 for ``n = 0``."""
    if boxes.shape[0] == 0:
        return heat_logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(heat_logits.float(), center_cells(boxes, grid))


def center_cells(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major index of the patch holding each box's center: ``(n, 4)`` normalized xyxy -> ``(n,)`` long."""
    h, w = grid
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 * w).long().clamp(0, w - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 * h).long().clamp(0, h - 1)
    return cy * w + cx


class DecoderExpert(Expert, options=DecoderOptions):
    """Base of the built-in experts: an attention decoder of width ``options.dim`` reading the task queries and the
    patch features, both projected into it (:class:`QueryProjection`, :class:`FeatureProjection`, with the LLM's
    visual-token states when ``llm_context``), with the grid's positional encoding (:class:`GridPositionalEncoding`).
    """

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        d = self.options.dim  # type: ignore[attr-defined]
        self.query_proj = QueryProjection(spec.hidden_size, d, self.options.query_norm)  # type: ignore[attr-defined]
        self.feature_proj = FeatureProjection(spec.vision_dim, d,
                                              spec.hidden_size if self.options.llm_context else 0)  # type: ignore
        self.pe = GridPositionalEncoding(d)
