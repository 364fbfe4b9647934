"""How fast a model's one-row weight products stream its LLM weights: the BLAS vs inductor's reduction.

Every ``nn.Linear`` of a shipped model's LLM (LM head included) multiplies one random row, as in a batch-1 decode
step: eagerly (``F.linear``, the BLAS), compiled as inductor compiles it, and compiled with
``taskmllm.model.matvec.MatVecPass`` (the rewrite ``compile=True`` uses on the CPU). Best of ``--repeats`` calls of
all products; GB/s of weights read, against the read bandwidth probe of the same run (issue #29).

    python bench/matvec.py --model smol --threads 1 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from _bandwidth import machine, read_bandwidth
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

from taskmllm.model.weight_layout import best_seconds


def products(weights: list[torch.Tensor], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows[i] (1, K_i) @ weights[i].T``: every product of one decode step, in one call."""
    return [F.linear(x, w) for x, w in zip(rows, weights)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a shipped model's name or a checkpoint directory")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from taskmllm.model.matvec import compile_options
    from taskmllm.router.pipeline import Pipeline

    bandwidth = read_bandwidth()
    report = {**machine(), "model": args.model, "read_bandwidth_gb_s": bandwidth, "dtypes": {}}
    for name in args.dtypes:
        llm = Pipeline.from_pretrained(args.model, dtype=getattr(torch, name)).model.mllm.llm
        weights = [m.weight.detach() for m in llm.modules() if isinstance(m, torch.nn.Linear)]
        rows = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]
        nbytes = sum(w.numel() * w.element_size() for w in {id(w): w for w in weights}.values())
        variants = {"blas": products, "compiled": torch.compile(products, dynamic=False),
                    "compiled_matvec": torch.compile(products, dynamic=False, options=compile_options("cpu"))}
        with torch.no_grad():
            want = products(weights, rows)
            rel_err = {k: max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(fn(weights, rows), want))
                       for k, fn in variants.items()}
            times = {k: best_seconds(lambda fn=fn: fn(weights, rows), args.repeats, warmup=2)
                     for k, fn in variants.items()}
        report["dtypes"][name] = {
            "matrices": len(weights), "weight_mb": round(nbytes / 1e6, 1),
            **{k: {"ms": round(t * 1e3, 2), "gb_s": round(nbytes / t / 1e9, 1),
                   "fraction_of_probe": round(nbytes / t / 1e9 / bandwidth, 3),
                   "max_rel_err": float(f"{rel_err[k]:.2g}")}
               for k, t in times.items()},
            "speedup_matvec_over_blas": round(times["blas"] / times["compiled_matvec"], 2)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
