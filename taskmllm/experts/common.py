"""Small building blocks shared by the experts: query and feature projections, positional encoding, box head."""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from taskmllm.experts.boxes import box_cxcywh_to_xyxy


class QueryProjection(nn.Module):
    """LISA's projection of LLM hidden states into the expert width: ``Linear(H,H) -> ReLU -> Linear(H,D)``.

    ``(..., H) -> (..., D)``.
    """

    def __init__(self, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, dim))

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        return self.net(query_states)


class FeatureProjection(nn.Module):
    """Vision features into the expert width: ``Linear(C, D) -> LayerNorm(D)``; ``(..., N, C) -> (..., N, D)``."""

    def __init__(self, vision_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features))


class GridPositionalEncoding(nn.Module):
    """segment_anything's random-Fourier positional encoding of a patch grid and of points.

    ``grid(h, w) -> (h*w, D)`` row-major like the patch tokens; ``points((..., 2) normalized x, y) -> (..., D)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"positional encoding width must be even, got {dim}")
        self.pe = PositionEmbeddingRandom(dim // 2)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        pe = self.pe(size)  # (D, h, w)
        return pe.flatten(1).transpose(0, 1)

    def points(self, coords: torch.Tensor) -> torch.Tensor:
        return self.pe._pe_encoding(coords.to(self.pe.positional_encoding_gaussian_matrix.dtype))


class BoxHead(nn.Module):
    """3-layer MLP to a sigmoid ``cx, cy, w, h`` box, returned as normalized xyxy; ``(..., D) -> (..., 4)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = MLP(dim, dim, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return box_cxcywh_to_xyxy(self.mlp(x).sigmoid())
