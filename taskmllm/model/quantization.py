"""Int8 weight-only quantization of linear layers, for decoding on the CPU (inference only).

A batch-1 decode step streams every LLM weight from memory once, so its speed follows the weight bytes: int8
weights are half of bf16's and a quarter of float32's. Each output row ``i`` of a weight ``W (out, in)`` gets one
scale ``s_i = max_j |W_ij| / 127`` and is stored as ``q_ij = round(W_ij / s_i)`` in ``[-127, 127]`` (symmetric,
per output channel: torchao's and gpt-fast's int8 weight-only scheme), so ``W ≈ q * s[:, None]`` with an error of
at most ``s_i / 2`` per weight. Activations stay in the model's floating dtype.

The product ``x @ (q * s).T`` is ATen's ``torch._weight_int8pack_mm`` on the CPU (the kernel torch.compile's
weight-only-int8 pattern lowers to; vectorized for bf16/fp16 activations, measured ~12x slower with float32 ones
on the project's AVX-512 host, so pair ``"int8"`` with ``dtype=torch.bfloat16``), and a dequantize + ``F.linear``
elsewhere. The scales are a floating buffer, so ``module.to(dtype)`` casts them with the activations; the int8
weights stay int8. A quantized model computes a slightly different function and cannot be saved as a checkpoint
(:func:`check_not_quantized`): quantize after loading, as ``Pipeline.from_pretrained(..., quantize="int8")`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from taskmllm.errors import ConfigError

QMAX = 127


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T + bias`` with an int8 ``qweight``.

    Args:
        qweight: ``(out, in)`` int8.
        scales: ``(out,)`` floating, one per output row.
        bias: ``(out,)`` or None.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ConfigError(f"Int8Linear needs a 2-D int8 weight, got {qweight.dtype} {tuple(qweight.shape)}")
        if scales.shape != qweight.shape[:1] or not scales.is_floating_point():
            raise ConfigError(f"Int8Linear needs floating scales of shape ({qweight.shape[0]},), "
                              f"got {scales.dtype} {tuple(scales.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize ``linear``'s weight per output row (computed in float32); the scales and bias keep its dtype."""
        weight = linear.weight.detach().float()  # (out, in)
        scales = weight.abs().amax(dim=1) / QMAX  # (out,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
        qweight = torch.round(weight / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scales.to(linear.weight.dtype), bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``(out, in)`` this layer multiplies by, in ``dtype``."""
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in)`` -> ``(..., out)`` in ``x``'s dtype."""
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales.to(x.dtype))  # (N, out)
        else:
            out = F.linear(flat, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


QUANTIZERS = {"int8": Int8Linear.from_linear}


def quantize_linears(module: nn.Module, method: str = "int8") -> int:
    """Replace every ``nn.Linear`` inside ``module`` by its quantized version, in place; returns how many.

    A weight shared by several layers (an LM head tied to the input embedding) is quantized into each linear
    layer that uses it; the embedding keeps the floating table (it is read one row per token).

    Raises:
        ConfigError: an unknown ``method`` (one of :data:`QUANTIZERS`).
    """
    if method not in QUANTIZERS:
        raise ConfigError(f"unknown quantization {method!r}; one of {sorted(QUANTIZERS)}")
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, QUANTIZERS[method](child))
    return len(targets)


def check_not_quantized(module: nn.Module) -> None:
    """Raise :class:`ConfigError` if ``module`` holds quantized layers (a checkpoint stores float weights)."""
    if any(isinstance(m, Int8Linear) for m in module.modules()):
        raise ConfigError("this model's linear layers are int8-quantized (inference only) and cannot be saved; "
                          "save the float model and quantize after loading")
