"""Projector from vision features to LLM embeddings (LLaVA ``mlp2x_gelu``), with optional token pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.model.config import ProjectorConfig


class Projector(nn.Module):
    """``Linear(C, H) -> GELU -> Linear(H, H)`` on every visual token (LLaVA-1.5's ``mlp2x_gelu``).

    Parameter names match transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``) so llava-hf
    weights load without renaming.
    """

    def __init__(self, config: ProjectorConfig, vision_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(vision_dim, hidden_size, bias=config.bias)
        self.act = nn.GELU() if config.kind == "mlp2x_gelu" else nn.Identity()
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=config.bias) if config.kind == "mlp2x_gelu" else None

    def pool(self, features: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Average-pool ``(F, N, C)`` patch tokens on their ``grid`` by ``config.pool`` per side."""
        k = self.config.pool
        if k == 1:
            return features, grid
        h, w = grid
        x = features.transpose(1, 2).reshape(features.shape[0], -1, h, w)  # (F, C, h, w)
        x = F.avg_pool2d(x, k, ceil_mode=True)
        new_grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), new_grid  # (F, h'*w', C)

    def pooled_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The token grid the LLM reads for a vision ``grid`` (:meth:`pool`'s ceil mode)."""
        k = self.config.pool
        return -(-grid[0] // k), -(-grid[1] // k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` vision features -> ``(..., H)`` LLM input embeddings."""
        x = self.act(self.linear_1(features))
        return self.linear_2(x) if self.linear_2 is not None else x
