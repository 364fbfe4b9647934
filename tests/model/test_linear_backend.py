"""oneDNN float32 linears: equal to ``F.linear`` up to rounding, taken only where eligible, scoped to their block."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from taskmllm.model import linear_backend
from taskmllm.model.linear_backend import MODE_MIN_ROWS, _OneDNNLinears, onednn_is_faster, onednn_linear, onednn_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("shape", [(16, 24), (3, 7, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=gen), torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_mode_takes_eligible_calls_only():
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(2, 8, 24)
    with torch.no_grad(), _OneDNNLinears():
        assert torch.equal(lin(x), onednn_linear(x, lin.weight, lin.bias)), "a float32 product of 16 rows"
        small = torch.randn(2, 24)
        assert torch.equal(lin(small), F.linear(small, lin.weight, lin.bias)), "2 rows stay with the BLAS"
        wide = lin.double()
        xd = x.double()
        assert torch.equal(wide(xd), F.linear(xd, wide.weight, wide.bias)), "float64 stays with the BLAS"


@pytest.mark.parametrize("shape", [(48, 256), (3, 16, 256)])
def test_backward_equals_the_blas_gradients(shape):
    """Autograd on: forward and both backward products by oneDNN; gradients of x, W and b equal the BLAS's up to
    rounding; a second derivative is refused."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(300, 256, generator=gen, requires_grad=True)
    b = torch.randn(300, generator=gen, requires_grad=True)
    up = torch.randn(*shape[:-1], 300, generator=gen)
    with _OneDNNLinears():
        out = F.linear(x, w, b)
    assert type(out.grad_fn).__name__ == "_LinearFunctionBackward"
    got = torch.autograd.grad(out, (x, w, b), up)
    want = torch.autograd.grad(F.linear(x, w, b), (x, w, b), up)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    with _OneDNNLinears():
        out = F.linear(x, w, b)
    (gx,) = torch.autograd.grad(out, x, up, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_the_context_enters_only_for_large_cpu_forwards(monkeypatch):
    assert isinstance(onednn_linears(MODE_MIN_ROWS - 1, "cpu"), contextlib.nullcontext)
    monkeypatch.setenv(linear_backend.ENV, "0")
    onednn_is_faster.cache_clear()
    try:
        assert not onednn_is_faster() and isinstance(onednn_linears(10_000, "cpu"), contextlib.nullcontext)
        monkeypatch.setenv(linear_backend.ENV, "1")
        onednn_is_faster.cache_clear()
        assert onednn_is_faster() and isinstance(onednn_linears(10_000, torch.device("cpu")), _OneDNNLinears)
        for device in ("cuda", "cuda:1", "meta"):  # another device's forward runs without the mode's Python calls
            assert isinstance(onednn_linears(10_000, device), contextlib.nullcontext)
    finally:
        monkeypatch.delenv(linear_backend.ENV)
        onednn_is_faster.cache_clear()


def test_a_forward_inside_the_mode_equals_the_plain_one_up_to_rounding():
    """A small MLP: same function, last bits only; nothing of the mode stays after the block."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        want = mlp(x)
        with _OneDNNLinears():
            got = mlp(x)
        after = mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, want)


def test_a_prefill_takes_onednn_and_decode_steps_do_not(tokenizer, monkeypatch):
    """``generate``: the prompt's forward and the vision tower run their float32 products through oneDNN (forced
    here, whatever this CPU's timing says); one-token steps do not enter the mode; tokens equal the BLAS-only run."""
    from tests.model.intervention_models import PROMPTS, images, varied_model

    model = varied_model(tokenizer)
    batch = model.processor(PROMPTS, images())
    rows = []
    real = linear_backend.onednn_linear

    def counted(x, weight, bias=None):
        rows.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(linear_backend, "onednn_linear", counted)
    monkeypatch.setenv(linear_backend.ENV, "0")
    onednn_is_faster.cache_clear()
    want = model.generate(batch, max_new_tokens=4).sequences
    assert rows == []
    monkeypatch.setenv(linear_backend.ENV, "1")
    onednn_is_faster.cache_clear()
    try:
        got = model.generate(batch, max_new_tokens=4).sequences
    finally:
        monkeypatch.delenv(linear_backend.ENV)
        onednn_is_faster.cache_clear()
    prompt_rows = batch.input_ids.numel()
    assert prompt_rows >= MODE_MIN_ROWS and prompt_rows in rows, "the prefill's products"
    assert all(n >= linear_backend.MIN_ROWS for n in rows), "no product of fewer rows"
    assert got == want


@pytest.mark.parametrize("kind", ["open_clip", "mobilenet_v2"])
def test_the_tower_runs_inside_the_mode_only_if_it_has_linears(tokenizer, monkeypatch, kind):
    """``encode_images``: a ViT tower's products go through the mode, a CNN's forward (no ``F.linear``) runs outside
    it (the mode would only add a Python call to each of its torch calls); the projector's always go through."""
    from torch.overrides import _get_current_function_mode_stack

    from taskmllm.model.mllm import TaskMLLM
    from tests.conftest import tiny_config

    vision = {"kind": kind, "image_size": 96, "feature_layer": 13} if kind == "mobilenet_v2" else {}
    model = TaskMLLM(tiny_config(tokenizer, **vision), tokenizer).eval()
    inside = {}

    def record(name):
        def hook(module, args):
            inside[name] = any(isinstance(m, _OneDNNLinears) for m in _get_current_function_mode_stack())
        return hook

    model.vision.register_forward_pre_hook(record("tower"))
    model.projector.register_forward_pre_hook(record("projector"))
    monkeypatch.setenv(linear_backend.ENV, "1")
    onednn_is_faster.cache_clear()
    try:
        size = model.config.vision.image_size
        with torch.no_grad():
            model.encode_images(torch.rand(4, 3, size, size))
    finally:
        monkeypatch.delenv(linear_backend.ENV)
        onednn_is_faster.cache_clear()
    assert inside == {"tower": kind != "mobilenet_v2", "projector": True}
