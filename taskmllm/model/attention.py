"""SDPA with half-precision decode steps on the CPU computed in float32 (a transformers attention function).

PyTorch's CPU flash-attention kernel handles a single query row poorly in bf16: measured on the project's
AVX-512 host (one thread, SmolLM2's 9 query / 3 key-value heads of 64, 128 cached keys) 95-121 us per call in
bf16 against 25-35 us for the same call on float32 copies of ``q, k, v`` (casts included); at 4-300 query rows
the two are within 20%. A batch-1 decode step of a 30-layer bf16 LLM spends ~3 ms of ~15 in it. ``taskmllm_sdpa``
is transformers' SDPA, except that a one-query-row call on the CPU with bf16/fp16 inputs runs in float32 and
casts the output back (more exact, not less). It is registered in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (with SDPA's masks), so a model uses it by name:
``llm.set_attn_implementation("taskmllm_sdpa")``; ``Pipeline.from_pretrained`` does this for a half-precision
model on the CPU (:func:`use_float32_decode_attention`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ATTN_NAME = "taskmllm_sdpa"
HALF = (torch.bfloat16, torch.float16)


def float32_decode_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` (``query (B, Hq, Q, D)``, ``key``/``value`` ``(B, Hkv, K, D)``
    -> ``(B, Q, Hq, D)``), in float32 when ``Q == 1`` on the CPU in half precision."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if query.device.type != "cpu" or query.dtype not in HALF or query.shape[2] != 1:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask in the computation's dtype
    out, weights = sdpa(module, query.float(), key.float(), value.float(), attention_mask, dropout=dropout,
                        scaling=scaling, **kwargs)
    return out.to(query.dtype), weights


def register() -> str:
    """Register ``taskmllm_sdpa`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, float32_decode_sdpa)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def is_sdpa(name: Optional[str]) -> bool:
    """Whether an attention implementation's name is SDPA's (transformers' own or ``taskmllm_sdpa``)."""
    return name in ("sdpa", ATTN_NAME)


def use_float32_decode_attention(llm: nn.Module) -> bool:
    """Switch an SDPA ``llm`` whose weights are bf16/fp16 on the CPU to ``taskmllm_sdpa``; returns whether it did
    (another attention implementation, a float32 model or a GPU model is left as it is)."""
    weight = next(llm.parameters())
    if llm.config._attn_implementation != "sdpa" or weight.device.type != "cpu" or weight.dtype not in HALF:
        return False
    llm.set_attn_implementation(register())
    return True
