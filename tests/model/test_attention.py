"""``taskmllm_sdpa``: transformers' SDPA itself, except a half-precision one-row call on the CPU, which equals
transformers' SDPA on float32 copies; Pipeline switches half-precision CPU models to it and only those."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from taskmllm.model.attention import ATTN_NAME, float32_decode_sdpa, is_sdpa
from taskmllm.router.pipeline import Pipeline


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


def _inputs(q_len: int, dtype: torch.dtype, additive: bool):
    torch.manual_seed(0)
    query = torch.randn(2, 9, q_len, 64).to(dtype)
    key, value = (torch.randn(2, 3, 40, 64).to(dtype) for _ in range(2))
    allowed = torch.ones(2, 1, q_len, 40, dtype=torch.bool)
    allowed[0, ..., :5] = False  # a left-padded row
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min) if additive \
        else allowed
    return query, key, value, mask


@pytest.mark.parametrize("additive", [False, True])
def test_a_half_precision_decode_step_is_sdpa_on_float32_copies(additive):
    query, key, value, mask = _inputs(1, torch.bfloat16, additive)
    got, _ = float32_decode_sdpa(_Attention(), query, key, value, mask, scaling=0.125)
    want, _ = sdpa_attention_forward(_Attention(), query.float(), key.float(), value.float(),
                                     mask.float() if additive else mask, scaling=0.125)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 9, 64)
    assert torch.equal(got, want.to(torch.bfloat16))
    plain, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.125)
    torch.testing.assert_close(got, plain, rtol=2e-2, atol=2e-2)  # bf16's own SDPA: close, not equal


@pytest.mark.parametrize("q_len, dtype", [(4, torch.bfloat16), (1, torch.float32)])
def test_other_calls_are_transformers_sdpa_bit_for_bit(q_len, dtype):
    query, key, value, mask = _inputs(q_len, dtype, False)
    got, _ = float32_decode_sdpa(_Attention(), query, key, value, mask, scaling=0.125)
    want, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.125)
    assert got.dtype == dtype and torch.equal(got, want)


def test_pipeline_switches_half_precision_cpu_models_only():
    assert is_sdpa("sdpa") and is_sdpa(ATTN_NAME) and not is_sdpa("eager")
    assert Pipeline.from_pretrained("tiny").model.mllm.llm.config._attn_implementation == "sdpa"
    half = Pipeline.from_pretrained("tiny", dtype=torch.bfloat16)
    assert half.model.mllm.llm.config._attn_implementation == ATTN_NAME
    batch = half.processor(["Is there a red circle?", "Segment the blue square."], [None, None])
    with torch.no_grad():
        eager = half.model.mllm.generate(batch, max_new_tokens=6)
        compiled = half.model.mllm.generate(batch, max_new_tokens=6, compile=True)
    assert eager.sequences == compiled.sequences
