"""Float32 linear layers through oneDNN on CPUs where it beats the BLAS, measured once per process.

PyTorch computes a float32 ``F.linear`` on the CPU with its BLAS (MKL in the PyPI wheels) and uses oneDNN, which it
also ships, for convolutions and half-precision products. Which of the two multiplies float32 matrices faster
depends on the CPU: on the project's host (AMD EPYC, Zen 5, AVX-512) MKL takes SmolLM2's products of 128-512 rows at
94-101 GFLOP/s and oneDNN at 180-199 (``python bench/linear_backend.py --model smol --threads 1``; the tiny LLM's
products of 744 rows 54 -> 32 ms). :func:`onednn_linears` is a context under which float32 CPU
``F.linear`` calls of at least :data:`MIN_ROWS` rows, outside autograd, run as oneDNN's
``torch.ops.mkldnn._linear_pointwise`` on the same dense weight: no copy of the weights, nothing to keep in sync
when they change. Where autograd records the product, its backward's two products are oneDNN's too
(:class:`_LinearFunction`: a training step of the tiny recipe's joint stage 0.547 -> 0.49 s, ``python
bench/train.py``). The results differ from the BLAS's in the last bits (another summation order).

It is a ``TorchFunctionMode`` (PyTorch's scoped interposition on torch functions), entered around forwards of many
rows only — a prefill, a ViT vision tower (a CNN one has no linears: ``VisionTower.has_linears``), the projector,
a teacher-forced forward (training or scoring) — since every torch call
inside a mode pays a Python call; one-token decode steps, compiled code and checkpointed training forwards (whose
recomputation in backward runs outside the block) run as they are. Whether oneDNN is faster is timed
once per process on one product (:func:`onednn_is_faster`, ~20 ms); ``TASKMLLM_ONEDNN_LINEAR=0`` (or ``1``) skips
the timing and decides.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from taskmllm.model.weight_layout import best_seconds

#: the fewest rows (leading dimensions multiplied) of a product oneDNN takes: on the project's host the two are
#: within ~10% at 8 rows (either way, by model and cache state) and oneDNN is ahead from 32 (1.3-2x)
MIN_ROWS = 16
#: the fewest rows of a forward around which the mode is entered (below, its per-call cost outweighs the gain)
MODE_MIN_ROWS = 32
ENV = "TASKMLLM_ONEDNN_LINEAR"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN: ``x (..., K)``, ``weight (N, K)`` -> ``(..., N)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_is_faster() -> bool:
    """Whether oneDNN computes a float32 product of 128 rows by a 1024 x 512 weight at least 1.25x as fast as
    ``F.linear`` on this CPU (best of 5 each; 2x on the project's host). The margin keeps a CPU where the two are
    close on the BLAS, so that runs on it do not switch kernels (and last bits) with the timing's noise.
    ``TASKMLLM_ONEDNN_LINEAR`` = ``0`` / ``1`` decides without timing. False where PyTorch has no oneDNN."""
    if os.environ.get(ENV) in ("0", "1"):
        return os.environ[ENV] == "1" and torch.backends.mkldnn.is_available()
    if not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.randn(128, 512), torch.randn(1024, 512)
    with torch.no_grad():
        return 1.25 * best_seconds(lambda: onednn_linear(x, w), 5) < best_seconds(lambda: F.linear(x, w), 5)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a tensor subclass (fake, distributed, quantized tensors)


def _eligible(x: torch.Tensor, weight: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """A float32 CPU product of at least :data:`MIN_ROWS` rows by a contiguous 2D weight (``tensors``: the
    product's operands, bias included)."""
    if any(type(t) not in _PLAIN or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    return weight.dim() == 2 and weight.is_contiguous() and x.dim() >= 2 and x.numel() >= MIN_ROWS * weight.shape[1]


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` whose forward and backward products are oneDNN's (float32 CPU tensors, first derivatives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (..., N)
        rows = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (..., N) @ (N, K)
        grad_w = None
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K)
            grad_w = onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t())
        grad_b = rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _OneDNNLinears(TorchFunctionMode):
    """Sends eligible ``F.linear`` calls to oneDNN (through :class:`_LinearFunction` when autograd records them);
    every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0] if args else kwargs["input"], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            tensors = (x, weight) if bias is None else (x, weight, bias)
            if _eligible(x, weight, tensors):
                if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                    return _LinearFunction.apply(x, weight, bias)
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def onednn_linears(rows: int, device: torch.device | str) -> ContextManager:
    """The context for a forward on ``device`` whose products have ``rows`` rows: oneDNN's float32 linears where
    they are faster on this CPU and the forward is large enough (:data:`MODE_MIN_ROWS`); a null context otherwise:
    on another device (where the mode would only add a Python call to every torch call), and inside code that
    ``torch.compile`` traces."""
    if (torch.device(device).type != "cpu" or rows < MODE_MIN_ROWS or torch.compiler.is_compiling()
            or not onednn_is_faster()):
        return contextlib.nullcontext()
    return _OneDNNLinears()
