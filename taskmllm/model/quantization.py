"""Int8 and int4 weight-only quantization of linear layers, for decoding on the CPU (inference only).

A batch-1 decode step streams every LLM weight from memory once, so its speed follows the weight bytes: int8
weights are half of bf16's and a quarter of float32's. Each output row ``i`` of a weight ``W (out, in)`` gets one
scale ``s_i = max_j |W_ij| / 127`` and is stored as ``q_ij = round(W_ij / s_i)`` in ``[-127, 127]`` (symmetric,
per output channel: torchao's and gpt-fast's int8 weight-only scheme), so ``W ≈ q * s[:, None]`` with an error of
at most ``s_i / 2`` per weight. Activations stay in the model's floating dtype.

The product ``x @ (q * s).T`` is ATen's ``torch._weight_int8pack_mm`` on the CPU for inputs of fewer than
:data:`KERNEL_MAX_ROWS` rows (decode steps; the kernel torch.compile's weight-only-int8 pattern lowers to;
vectorized for bf16/fp16 activations, measured ~10x slower with float32 ones on the project's AVX-512 host, so
pair ``"int8"`` with ``dtype=torch.bfloat16``), and a dequantize + ``F.linear`` for longer inputs and elsewhere.
The scales are a floating buffer, so ``module.to(dtype)`` casts them with the activations; the int8 weights stay
int8. A quantized model computes a slightly different function and cannot be saved as a checkpoint
(:func:`check_not_quantized`): quantize after loading, as ``Pipeline.from_pretrained(..., quantize="int8")`` does.

``"int4"`` (:class:`Int4Linear`) stores each row in groups of 32 input columns, each group with its own scale and
minimum (llama.cpp's Q4_1 and gpt-fast's int4 scheme): 0.625 bytes per weight with the bf16 scales, the CPU only
(ATen's ``torch._weight_int4pack_mm_for_cpu``), a larger error than int8's (half a step of 1/15 of a group's
range, against 1/254 of a row's).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from taskmllm.errors import ConfigError, InputError

QMAX = 127
#: inputs with at least this many rows are multiplied by the dequantized weight instead: the int8 kernel is a
#: matrix-vector product per row (its time grows linearly with the rows), measured on SmolLM2's 1536 x 576 MLP
#: weight in bf16 at one thread: 0.02 ms at 1 row, 0.38 at 32, 18.9 at 1,600 against 0.27 / 0.38 / 6.6 ms for
#: dequantize + the BLAS's bf16 GEMM (a prefill or a batch of long prompts)
KERNEL_MAX_ROWS = 32


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
        kernel = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        if kernel and flat.shape[0] < KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales.to(x.dtype))  # (N, out)
        else:
            out = F.linear(flat, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with each row of ``W`` in groups of ``group_size`` input columns stored as 4-bit
    ``q`` in ``[0, 15]``, ``W ≈ q * scale + minimum`` per group; ATen's CPU int4 kernel (CPU only).

    Args:
        packed: the kernel's layout of ``q`` (``torch._convert_weight_to_int4pack_for_cpu``), ``(out', in' / 2)``
            uint8: the rows padded to a multiple of 16 (the kernel's block), the columns to one of ``group_size``.
        scales_and_zeros: ``(in' / group_size, out', 2)`` floating: per group its scale and the kernel's zero
            (``minimum + 8 * scale``: the kernel computes ``(q - 8) * scale + zero``).
        in_features, out_features: the real columns and rows (the input is padded, the output sliced).
        group_size: input columns per group.
        bias: ``(out,)`` or None.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 group_size: int, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        """Quantize ``linear``'s weight per row and group (computed in float32); scales and bias keep its dtype.
        Input columns are padded with zeros to a multiple of ``group_size`` (and the input with them).

        Raises:
            ConfigError: a weight off the CPU.
        """
        weight = linear.weight.detach()
        if weight.device.type != "cpu":
            raise ConfigError(f"int4 quantization runs on ATen's CPU kernel only, the weight is on {weight.device}; "
                              "use 'int8' there")
        out, inp = weight.shape
        rows, cols = -(-out // 16) * 16, -(-inp // group_size) * group_size  # the kernel's blocks; padding is 0
        groups = F.pad(weight.float(), (0, cols - inp, 0, rows - out)).reshape(rows, cols // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # (rows, cols / group_size)
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is its minimum
        q = torch.round((groups - low[..., None]) / safe[..., None]).clamp_(0, 15).reshape(rows, cols)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # (rows, cols / 2) uint8
        zeros = low + 8 * scale
        scales_and_zeros = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()  # (cols / G, rows, 2)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, scales_and_zeros.to(weight.dtype), inp, out, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in)`` -> ``(..., out)`` in ``x``'s dtype.

        Raises:
            InputError: ``x`` off the CPU (the kernel's packing is the CPU's).
        """
        if x.device.type != "cpu":
            raise InputError(f"an int4-quantized layer runs on the CPU only, got input on {x.device}")
        flat = x.reshape(-1, self.in_features)  # (N, in)
        cols = self.packed.shape[1] * 2
        flat = F.pad(flat, (0, cols - self.in_features)) if cols > self.in_features else flat.contiguous()
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                self.scales_and_zeros.to(x.dtype))  # (N, rows)
        out = out[:, :self.out_features]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


QUANTIZERS = {"int8": Int8Linear.from_linear, "int4": Int4Linear.from_linear}


def quantize_linears(module: nn.Module, method: str = "int8") -> int:
    """Replace every ``nn.Linear`` inside ``module`` by its quantized version, in place; returns how many.

    A weight shared by several layers (an LM head tied to the input embedding) is quantized into each linear
    layer that uses it; the embedding keeps the floating table (it is read one row per token).

    Raises:
        ConfigError: an unknown ``method`` (one of :data:`QUANTIZERS`).
    """
    check_quantization(method)
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, QUANTIZERS[method](child))
    return len(targets)


def check_quantization(method: str) -> None:
    """Raise :class:`ConfigError` naming the choices unless ``method`` is one of :data:`QUANTIZERS`."""
    if method not in QUANTIZERS:
        raise ConfigError(f"unknown quantization {method!r}; one of {sorted(QUANTIZERS)}")


def check_not_quantized(module: nn.Module) -> None:
    """Raise :class:`ConfigError` if ``module`` holds quantized layers (a checkpoint stores float weights)."""
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in module.modules()):
        raise ConfigError("this model's linear layers are quantized (inference only) and cannot be saved; "
                          "save the float model and quantize after loading")
