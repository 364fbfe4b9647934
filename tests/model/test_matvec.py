"""The compiled decode step's one-row weight products as reductions: the rewritten graph against ``F.linear``, the
code inductor generates with and without the pass, and batch-1 tokens of ``compile=True`` against the default
decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from taskmllm.model.matvec import MatVecPass, compile_options
from tests.model.intervention_models import varied_model

aten = torch.ops.aten


def _products(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_products_become_reductions_equal_to_linear(bias):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 40), torch.randn(24, 40), torch.randn(24) if bias else None
    gm = make_fx(lambda x, w, b: F.linear(x, w, b), tracing_mode="fake")(x, w, b)
    assert _products(gm)
    MatVecPass()(gm.graph)
    gm.recompile()
    assert not _products(gm)
    torch.testing.assert_close(gm(x, w, b), F.linear(x, w, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [3, 8])
def test_a_few_rows_of_a_small_float32_weight_become_reductions_equal_to_linear(rows):
    torch.manual_seed(0)
    x, w = torch.randn(rows, 40), torch.randn(24, 40)
    gm = make_fx(lambda x, w: F.linear(x, w), tracing_mode="fake")(x, w)
    MatVecPass()(gm.graph)
    gm.recompile()
    assert not _products(gm)
    torch.testing.assert_close(gm(x, w), F.linear(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows, shape, dtype, column_major", [
    (9, (24, 40), torch.float32, False),  # more rows than MAX_ROWS
    (2, (1024, 257), torch.float32, False),  # a weight over SMALL_WEIGHT_BYTES (1 MiB + 4 KiB)
    (2, (24, 40), torch.bfloat16, False),  # several rows in half precision: the BLAS's dot products win (smol)
    (1, (24, 40), torch.float32, True)])  # weight_layout="tuned"'s column-major storage
def test_other_products_are_left_to_the_blas(rows, shape, dtype, column_major):
    w = torch.randn(*shape, dtype=dtype)
    w = w.t().contiguous().t() if column_major else w
    gm = make_fx(lambda x, w: F.linear(x, w), tracing_mode="fake")(torch.randn(rows, shape[1], dtype=dtype), w)
    before = str(gm.graph)
    MatVecPass()(gm.graph)
    assert str(gm.graph) == before


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_inductor_generates_a_loop_instead_of_the_blas_call(dtype, tol):
    """With the pass the generated code has no extern ``mm``/``addmm`` for one row (and for three in float32), and
    still has it for nine (and for three in bfloat16)."""
    torch.manual_seed(0)
    w, b = torch.randn(64, 96, dtype=dtype), torch.randn(64, dtype=dtype)
    fn = torch.compile(lambda x: F.linear(x, w, b), dynamic=False, options=compile_options("cpu"))
    for rows, rewritten in ((1, True), (3, dtype == torch.float32), (9, False)):
        x = torch.randn(rows, 96, dtype=dtype)
        out, code = run_and_get_code(fn, x)
        torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol)
        calls = "extern_kernels.mm" in code[0] or "extern_kernels.addmm" in code[0]
        assert calls is not rewritten, code[0]


def test_options_are_cpu_only():
    assert isinstance(compile_options("cpu")["post_grad_custom_pre_pass"], MatVecPass)
    assert compile_options("cuda") == {} and compile_options(torch.device("meta")) == {}


def test_batch_one_compiled_decode_gives_the_default_tokens(tokenizer, rgb_image):
    """Batch 1 is the case the pass rewrites: greedy tokens of the compiled step equal the default decoder's (a
    random 2-layer model with large weights, whose greedy tokens do not collapse to one)."""
    model = varied_model(tokenizer, layers=2)
    batch = model.processor(["Describe the picture."], [rgb_image])
    want = model.generate(batch, max_new_tokens=16).sequences
    assert len(set(want[0])) > 4
    assert model.generate(batch, max_new_tokens=16, compile=True).sequences == want
