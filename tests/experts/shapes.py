"""Test helpers for the experts: a trainable stand-in vision tower and mask IoU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PatchEmbed(nn.Module):
    """A trainable stand-in vision tower: ``(B, 3, S, S) -> (B, N, C)`` with a stride-``patch`` Conv2d."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(2).transpose(1, 2)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
