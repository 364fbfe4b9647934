"""Attention masks as interventions see them: whatever 4D mask transformers hands an attention function (None for
a plain causal pass, boolean "allowed", or additive float) as one additive float mask; and where each row of a 2D
padding mask starts and ends."""

from __future__ import annotations

from typing import Optional

import torch

from taskmllm.errors import InputError


def _real(attention_mask: torch.Tensor) -> torch.Tensor:
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise InputError("a prompt of the batch has no real token (its attention mask is all zeros)")
    return real


def first_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` attention mask -> ``(B,)`` index of each row's first real (mask 1) token, on any padding side.

    Raises:
        InputError: a row has no real token.
    """
    return _real(attention_mask).long().argmax(-1)


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` attention mask -> ``(B,)`` index of each row's last real (mask 1) token, on any padding side.

    Raises:
        InputError: a row has no real token.
    """
    real = _real(attention_mask)
    return (real.shape[-1] - 1) - real.flip(-1).long().argmax(-1)


def additive_mask(mask: Optional[torch.Tensor], q_len: int, k_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Any transformers 4D mask (None = causal with the queries last, boolean = allowed, float = additive) as an
    additive float mask ``(B|1, 1|heads, Q, K)`` for eager attention."""
    low = torch.finfo(dtype).min
    if mask is None:
        allowed = torch.arange(k_len, device=device)[None] <= torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, low)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)[..., :k_len]
    return mask[..., :k_len]
