"""A decoder layer for per-frame query states with causal memory across frames (used by tracking)."""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn


def frame_time_encoding(num_frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encoding of frame indices 0..T-1 (Vaswani et al.): ``(T, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    t = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * freqs[None]
    enc = torch.cat([t.sin(), t.cos()], dim=-1)
    if enc.shape[1] < dim:
        enc = torch.cat([enc, enc.new_zeros(num_frames, dim - enc.shape[1])], dim=-1)
    return enc.to(dtype)


def causal_frame_mask(num_frames: int, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    """``(T*K, T*K)`` bool attention mask, True where a token of frame t would see a token of a later frame."""
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[None, :] > frame[:, None]


class CausalFrameLayer(nn.Module):
    """Pre-norm layer: per-frame cross-attention to that frame's patches, causal self-attention over the
    states of this and earlier frames, then an MLP.

    ``states (M, T, K, D)``, ``frames (M, T, N, D)``, ``frame_pe (N, D)`` -> ``(M, T, K, D)``. The output at
    frame t depends only on frames <= t, so a tracker built from these layers can run online.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_time = nn.LayerNorm(dim)
        self.time_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, states: torch.Tensor, frames: torch.Tensor, frame_pe: torch.Tensor) -> torch.Tensor:
        m, t, k, d = states.shape
        n = frames.shape[2]
        q = self.norm_cross(states).reshape(m * t, k, d)
        mem = frames.reshape(m * t, n, d)
        cross, _ = self.cross_attn(q, mem + frame_pe[None], mem, need_weights=False)
        states = states + cross.reshape(m, t, k, d)
        x = self.norm_time(states).reshape(m, t * k, d)
        mask = causal_frame_mask(t, k, states.device)
        temporal, _ = self.time_attn(x, x, x, attn_mask=mask, need_weights=False)
        states = states + temporal.reshape(m, t, k, d)
        return states + self.mlp(self.norm_mlp(states))
