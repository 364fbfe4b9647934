"""Int8 weight-only quantization: the per-row scheme against hand-computed values, the ATen kernel against the
dequantized product, its error bound, and Pipeline's ``quantize="int8"`` on the shipped tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.quantization import Int8Linear, quantize_linears
from taskmllm.router.pipeline import Pipeline


def test_rows_are_scaled_by_their_largest_weight():
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.2, -1.0, 0.25], [0.0, 0.0, 0.0], [2.54, 1.0, -0.3]]))
    q = Int8Linear.from_linear(linear)
    # row 0: s = 1/127, 0.2*127 = 25.4 -> 25, 0.25*127 = 31.75 -> 32; row 1 all zero; row 2: s = 2.54/127 = 0.02
    assert q.qweight.tolist() == [[25, -127, 32], [0, 0, 0], [127, 50, -15]]
    torch.testing.assert_close(q.scales, torch.tensor([1 / 127, 0.0, 0.02]))
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_the_product_is_the_dequantized_matmul_and_within_half_a_step(dtype, tol):
    """float32/bfloat16 run ATen's int8 kernel, float64 the dequantize fallback; both equal ``x @ (q s).T``."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q = Int8Linear.from_linear(linear).to(dtype)
    x = torch.randn(2, 5, 96)
    want = x.double() @ (q.qweight.double() * q.scales.double()[:, None]).T + q.bias.double()
    got = q(x.to(dtype))
    assert got.shape == (2, 5, 40) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # each weight is off by at most half its row's step: |y - x W^T| <= sum_j |x_j| * s_i / 2
    bound = x.double().abs().sum(-1, keepdim=True) * Int8Linear.from_linear(linear).scales.double() / 2
    error = (want - linear(x).double()).abs()
    assert (error <= bound + 1e-6).all()


def test_bad_weights_and_methods_are_named():
    with pytest.raises(ConfigError, match="2-D int8"):
        Int8Linear(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        Int8Linear(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ConfigError, match="unknown quantization 'int4'"):
        quantize_linears(nn.Linear(2, 2), "int4")


@pytest.fixture(scope="module")
def tiny_pair():
    return Pipeline.from_pretrained("tiny"), Pipeline.from_pretrained("tiny", quantize="int8")


def test_pipeline_quantizes_every_llm_linear_and_keeps_the_embedding(tiny_pair):
    plain, quant = tiny_pair
    llm = quant.model.mllm.llm
    assert not any(isinstance(m, nn.Linear) for m in llm.modules())
    assert isinstance(llm.get_output_embeddings(), Int8Linear)
    embed = llm.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and torch.equal(embed, plain.model.mllm.llm.get_input_embeddings().weight)
    assert any(isinstance(m, nn.Linear) for m in quant.model.mllm.projector.modules()), "only the LLM is quantized"


def test_quantized_logits_stay_close_and_the_compiled_step_agrees(tiny_pair):
    plain, quant = tiny_pair
    batch = plain.processor(["What is in the picture?"], [None])
    with torch.no_grad():
        want = plain.model.mllm(batch).logits
        got = quant.model.mllm(batch).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    with torch.no_grad():
        eager = quant.model.mllm.generate(batch, max_new_tokens=6)
        compiled = quant.model.mllm.generate(batch, max_new_tokens=6, compile=True)
    assert eager.sequences == compiled.sequences and len(eager.sequences[0]) > 0


def test_a_bfloat16_quantized_model_answers_like_the_float_one():
    plain = Pipeline.from_pretrained("tiny")
    quant = Pipeline.from_pretrained("tiny", dtype=torch.bfloat16, quantize="int8")
    head = quant.model.mllm.llm.get_output_embeddings()
    assert head.qweight.dtype == torch.int8 and head.scales.dtype == torch.bfloat16
    prompt = "Segment the red circle."
    assert quant(None, prompt, max_new_tokens=8).text == plain(None, prompt, max_new_tokens=8).text


def test_a_quantized_model_is_not_saved(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="int8-quantized"):
        tiny_pair[1].model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists(), "the atomic write leaves nothing behind"
