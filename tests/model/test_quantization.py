"""Int8 / int4 weight-only quantization: the schemes against hand-computed values, the ATen kernels against the
dequantized product (the test's own port of each scheme), their error bounds, and Pipeline's ``quantize=`` on the
shipped tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.quantization import KERNEL_MAX_ROWS, Int4Linear, Int8Linear, quantize_linears
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


@pytest.mark.parametrize("rows", [5, 20])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_the_product_is_the_dequantized_matmul_and_within_half_a_step(dtype, tol, rows):
    """float32/bfloat16 with fewer than KERNEL_MAX_ROWS rows run ATen's int8 kernel, 40 rows and float64 the
    dequantized weight; each equals ``x @ (q s).T``."""
    assert 2 * 5 < KERNEL_MAX_ROWS <= 2 * 20, "the two row counts take the two paths"
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q = Int8Linear.from_linear(linear).to(dtype)
    x = torch.randn(2, rows, 96)
    want = x.double() @ (q.qweight.double() * q.scales.double()[:, None]).T + q.bias.double()
    got = q(x.to(dtype))
    assert got.shape == (2, rows, 40) and got.dtype == dtype
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
    with pytest.raises(ConfigError, match="unknown quantization 'int2'"):
        quantize_linears(nn.Linear(2, 2), "int2")
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        Pipeline.from_pretrained("/nonexistent/checkpoint", quantize="int3")  # refused before any file is read
    with pytest.raises(InputError, match="CPU only"):
        Int4Linear.from_linear(nn.Linear(32, 16)).to("meta")(torch.zeros(1, 32, device="meta"))


def test_int4_keeps_weights_on_its_grid_exactly():
    """A row whose 32 weights are -2 + 0.5 * (j mod 16): minimum -2, scale 0.5, q = j mod 16, no rounding; the
    one real row of a 16-row kernel block comes out alone."""
    linear = nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(-2 + 0.5 * (torch.arange(32) % 16).float()[None])
    q = Int4Linear.from_linear(linear)
    assert q.packed.shape == (16, 16) and q.scales_and_zeros.shape == (1, 16, 2)
    torch.testing.assert_close(q.scales_and_zeros[0, 0], torch.tensor([0.5, -2 + 8 * 0.5]))
    got = q(torch.eye(32))  # row j: the weight of column j
    assert got.shape == (32, 1)
    torch.testing.assert_close(got[:, 0], linear.weight[0], rtol=0, atol=1e-6)


def int4_oracle(weight: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 by hand: per row and group of ``group`` columns, scale = (max - min) / 15, q = round((w - min) / scale);
    returns the dequantized weight and each weight's scale."""
    out, inp = weight.shape
    w = weight.double().reshape(out, inp // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low) / 15
    q = torch.round((w - low) / scale).clamp(0, 15)
    return (q * scale + low).reshape(out, inp), scale.expand_as(w).reshape(out, inp)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_int4_is_the_groupwise_dequantized_matmul_within_half_a_step(dtype, tol):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)  # 40 rows padded to 48 for the kernel, 48 columns to 64 (zeros): sliced back
    q = Int4Linear.from_linear(linear).to(dtype)
    x = torch.randn(2, 3, 48)
    padded = torch.cat([linear.weight.detach(), torch.zeros(40, 16)], 1)
    dequantized, scale = (t[:, :48] for t in int4_oracle(padded))
    want = x.double() @ dequantized.T + linear.bias.double()
    got = q(x.to(dtype))
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert ((dequantized - linear.weight.double()).abs() <= scale / 2 + 1e-7).all(), "each weight within half a step"


@pytest.fixture(scope="module", params=["int8", "int4"])
def tiny_pair(request):
    return Pipeline.from_pretrained("tiny"), Pipeline.from_pretrained("tiny", quantize=request.param)


def test_pipeline_quantizes_every_llm_linear_and_keeps_the_embedding(tiny_pair):
    plain, quant = tiny_pair
    llm = quant.model.mllm.llm
    assert not any(isinstance(m, nn.Linear) for m in llm.modules())
    assert isinstance(llm.get_output_embeddings(), (Int8Linear, Int4Linear))
    embed = llm.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and torch.equal(embed, plain.model.mllm.llm.get_input_embeddings().weight)
    assert any(isinstance(m, nn.Linear) for m in quant.model.mllm.projector.modules()), "only the LLM is quantized"


def test_quantized_logits_stay_close_and_the_compiled_step_agrees(tiny_pair):
    plain, quant = tiny_pair
    batch = plain.processor(["What is in the picture?"], [None])
    with torch.no_grad():
        want = plain.model.mllm(batch).logits
        got = quant.model.mllm(batch).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
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
    with pytest.raises(ConfigError, match="are quantized"):
        tiny_pair[1].model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists(), "the atomic write leaves nothing behind"
