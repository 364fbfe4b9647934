"""The memory layout of linear weights that reads fastest on the CPU, chosen by measurement.

A decode step at batch 1 multiplies one row by every weight matrix once, so it streams the weights from memory.
``F.linear(x, W)`` computes ``x @ W.T``; which memory order of ``W`` ``(out, in)`` the BLAS streams fastest
depends on the shape and the machine. Measured on the project's 2-core machine (one thread, each weight read
from DRAM): SmolLM2's ``1536 x 576`` MLP inputs and its ``49162 x 576`` LM head run at ~2-4x the speed when ``W``
is stored column-major (``W.T`` contiguous), while its ``576 x 1536`` and ``576 x 576`` matrices are faster
row-major (the stored order). :func:`tune_linear_layout` times both orders for every weight shape of a module
(all weights of a shape in one pass, larger than the caches, as a decode step reads them) and keeps the faster.

The values, shapes, dtypes and parameters are unchanged (only ``param.data``'s strides), so the module computes
the same function; results can differ in the last bits (a different BLAS kernel sums in another order). Meant
for inference (``Pipeline.from_pretrained(..., weight_layout="tuned")``); a save still writes row-major files
(safetensors' ``save_model`` copies non-contiguous tensors).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from taskmllm.errors import ConfigError

LAYOUTS = ("row", "column")


def layout_of(weight: torch.Tensor) -> str:
    """``"row"`` (``(out, in)`` contiguous, PyTorch's default) or ``"column"`` (its transpose contiguous)."""
    return "column" if weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous() else "row"


def _in_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` ``(out, in)`` with the same values stored in ``layout``."""
    if layout == "row":
        return weight.contiguous()
    return weight.t().contiguous().t()


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The best wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (which compile, allocate,
    select kernels, warm the caches)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def tune_linear_layout(module: nn.Module, rows: int = 1, repeats: int = 3) -> dict[str, dict]:
    """Store every ``nn.Linear`` weight of ``module`` in the faster of the two layouts for ``rows`` input rows.

    Weights are grouped by ``(out, in, dtype)``; each group is timed as one pass over all its matrices (a tied
    weight counts once) in each layout, best of ``repeats``. CPU floating-point weights only; others are left.

    Returns:
        ``{"OUTxIN dtype": {"row": seconds, "column": seconds, "chosen": ...}}`` per group (seconds per pass).

    Raises:
        ConfigError: ``rows`` < 1 or ``repeats`` < 1.
    """
    if rows < 1 or repeats < 1:
        raise ConfigError(f"tune_linear_layout needs rows >= 1 and repeats >= 1, got rows={rows}, repeats={repeats}")
    groups: dict[tuple[int, int, torch.dtype], list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, nn.Linear) or weight is None or id(weight) in seen:
            continue
        if weight.device.type != "cpu" or not weight.is_floating_point():
            continue
        seen.add(id(weight))
        groups[(layer.out_features, layer.in_features, weight.dtype)].append(weight)
    report: dict[str, dict] = {}
    with torch.no_grad():
        for (out, inp, dtype), weights in groups.items():
            x = torch.randn(rows, inp, dtype=dtype)
            times = {}
            for layout in LAYOUTS:
                stored = [_in_layout(w.data, layout) for w in weights]
                times[layout] = best_seconds(lambda: [nn.functional.linear(x, w) for w in stored], repeats)
                del stored
            chosen = min(LAYOUTS, key=times.__getitem__)
            for w in weights:
                if layout_of(w.data) != chosen:
                    w.data = _in_layout(w.data, chosen)
            report[f"{out}x{inp} {str(dtype).removeprefix('torch.')}"] = {
                "row": round(times["row"], 6), "column": round(times["column"], 6), "chosen": chosen}
    return report

