"""Matrix-vector products as streaming reductions in the compiled CPU decode step (an inductor graph pass).

A batch-1 decode step multiplies one row of activations by every weight matrix of the LLM, so its speed is the
rate at which the weights stream from memory. On the CPU inductor hands ``mm`` / ``addmm`` to the BLAS, whose
one-row kernels read weights well below the memory's bandwidth; it decomposes a one-row product into a
multiply + sum only on other devices. Written as that reduction, inductor generates one vectorized loop per
product that reads the weight rows at near the bandwidth. ``python bench/matvec.py --model smol --threads 1`` on
the project's AVX-512 host (SmolLM2-135M's 211 matrices): float32 31.1 -> 16.6 ms (17 -> 32 GB/s), bfloat16
19.4 -> 8.5 ms (14 -> 32 GB/s), 77-79% of the read probe's 41 GB/s. With several rows the loop reads the weight
once per row: that pays only while the weight stays in a core's L2 cache between rows, and against MKL's float32
GEMM, which packs the weight on every call (bf16's dot-product kernels are faster at several rows). So products of
one row are rewritten, and products of up to :data:`MAX_ROWS` rows of a float32 weight of at most
:data:`SMALL_WEIGHT_BYTES` (the tiny LLM's every product; SmolLM2's key / value projections): a compiled batch-8
call of ``bench/generate.py``'s model 1.067x as fast, batch 4 1.11x, batch 1 unchanged, tokens equal (old and new
pass alternated in one process); ``smol`` in float32 at batch 8 1.016x. Rewriting bf16 products too made ``smol``'s
batch-8 call 5% slower. Only weights stored row-major are rewritten (the stored layout; a column-major
``weight_layout="tuned"`` weight stays with the BLAS, for which that layout is made).

:class:`MatVecPass` is an inductor ``post_grad_custom_pre_pass``: ``torch.compile(fn,
options=compile_options(device))``. The sum runs in the reduction order of inductor's loop, not the BLAS's: the
results differ from eager in the last bits (float32) or by the output's rounding (bfloat16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


def _value(node: object) -> torch.Tensor | None:
    """The traced (fake) value of a 2D graph operand, if there is one."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None


#: products of up to this many rows are rewritten when their weight is small (:data:`SMALL_WEIGHT_BYTES`)
MAX_ROWS = 8
#: a weight the loop may read once per row: it stays in a core's L2 cache (1 MiB per core on the project's Zen 5)
SMALL_WEIGHT_BYTES = 1 << 20


def _rewritable(a: object, b: object) -> bool:
    """``a (M, K) @ b (K, N)`` with one static row (or up to :data:`MAX_ROWS` rows of a weight of at most
    :data:`SMALL_WEIGHT_BYTES`), ``b``'s columns contiguous (a row-major ``(N, K)`` weight seen through ``.T``): a
    column-major weight (``weight_layout="tuned"``) would make the sum stride across rows."""
    a_val, b_val = _value(a), _value(b)
    if a_val is None or b_val is None or not isinstance(a_val.shape[0], int):
        return False
    rows, weight_bytes = a_val.shape[0], b_val.numel() * b_val.element_size()
    fits = rows == 1 or (rows <= MAX_ROWS and b_val.dtype == torch.float32 and isinstance(weight_bytes, int)
                         and weight_bytes <= SMALL_WEIGHT_BYTES)
    return fits and isinstance(b_val.stride(0), int) and b_val.stride(0) == 1


class MatVecPass(CustomGraphPass):
    """Rewrites ``mm(a, b)`` and ``addmm(c, a, b)`` whose ``a`` has one row (or a few, :func:`_rewritable`) into
    ``sum(b.T * a, -1)`` (+ ``c``)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            bias, (a, b) = (node.args[0], node.args[1:3]) if node.target is aten.addmm.default else (None, node.args)
            if node.kwargs or not _rewritable(a, b) or (bias is not None and len(node.args) != 3):
                continue  # addmm with beta/alpha, several rows or a column-major weight: left to the BLAS
            with graph.inserting_before(node):
                out = _matvec(graph, a, b)
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> Any:
        """What inductor's caches key the pass by: its source and the limits it reads."""
        return get_hash_for_files((__file__,)), MAX_ROWS, SMALL_WEIGHT_BYTES


def _matvec(graph: torch.fx.Graph, a: torch.fx.Node, b: torch.fx.Node) -> torch.fx.Node:
    """``a (M, K) @ b (K, N)`` as ``sum(b.T[None] * a[:, None], 2)``: one pass per row of ``a`` over each of
    ``b``'s columns (a row of the stored ``(N, K)`` weight of ``F.linear``)."""
    call = graph.call_function
    weight_rows = call(aten.unsqueeze.default, (call(aten.permute.default, (b, [1, 0])), 0))  # (1, N, K)
    product = call(aten.mul.Tensor, (weight_rows, call(aten.unsqueeze.default, (a, 1))))  # (M, N, K)
    return call(aten.sum.dim_IntList, (product, [2]))  # (M, N)


def compile_options(device: torch.device | str) -> dict[str, Any]:
    """``torch.compile`` options for a decode step on ``device``: the :class:`MatVecPass` on the CPU, none elsewhere
    (GPUs run one-row products in cuBLAS's GEMV kernels)."""
    if torch.device(device).type != "cpu":
        return {}
    return {"post_grad_custom_pre_pass": MatVecPass()}
