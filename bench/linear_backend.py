"""Float32 weight products of a shipped model's LLM: the BLAS (``F.linear``) against oneDNN on the same weights.

Every ``nn.Linear`` of the LLM (LM head excluded: a prefill multiplies only the last rows by it) multiplies
``--rows`` random rows each, as a prefill or a batched decode step does: ``F.linear`` (MKL in PyTorch's wheels) and
``taskmllm.model.linear_backend.onednn_linear``. Best of ``--repeats`` passes over all products; GFLOP/s, the
speed-up over the BLAS in the same run, the largest relative difference, and what ``onednn_is_faster`` decided.

    python bench/linear_backend.py --model smol --threads 1 --rows 1 8 32 128 512
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from _bandwidth import machine
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

from taskmllm.model.weight_layout import best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a shipped model's name or a checkpoint directory")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from taskmllm.model.linear_backend import onednn_is_faster, onednn_linear
    from taskmllm.router.pipeline import Pipeline

    llm = Pipeline.from_pretrained(args.model).model.mllm.llm
    head = llm.get_output_embeddings()
    weights = [m.weight.detach() for m in llm.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    report = {**machine(), "model": args.model, "matrices": len(weights), "onednn_is_faster": onednn_is_faster(),
              "rows": {}}
    for n in args.rows:
        rows = {k: torch.randn(n, k) for k in {w.shape[1] for w in weights}}
        flops = 2 * n * sum(w.numel() for w in weights)
        variants = {"blas": lambda: [F.linear(rows[w.shape[1]], w) for w in weights],
                    "onednn": lambda: [onednn_linear(rows[w.shape[1]], w) for w in weights]}
        with torch.no_grad():
            want, got = variants["blas"](), variants["onednn"]()
            rel = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, want))
            times = {k: best_seconds(fn, args.repeats, warmup=2) for k, fn in variants.items()}
        report["rows"][str(n)] = {**{k: {"ms": round(t * 1e3, 3), "gflop_s": round(flops / t / 1e9, 1)}
                                     for k, t in times.items()},
                                  "speedup_onednn_over_blas": round(times["blas"] / times["onednn"], 2),
                                  "max_rel_diff": float(f"{rel:.2g}")}
    emit(report, args.out)


if __name__ == "__main__":
    main()
