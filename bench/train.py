"""Training throughput of a recipe's stage: samples/s, tokens/s and model FLOPs utilisation (MFU), as JSON.

Runs the real training loop (:func:`taskmllm.training.train.train`) for ``--warmup + --steps`` steps of one
process on a fresh model of the recipe (``--recipe tiny --stage joint`` by default; config overrides pass
through, e.g. ``--data.batch_size=8 --precision=bf16``). Samples/s is measured over the steps after the warm-up
from the per-step clock of ``metrics.jsonl``.

- **FLOPs per sample**: the model as configured, counted once by ``torch.utils.flop_counter.FlopCounterMode``
  over the forward and backward of one micro-batch of the stage's data (every matmul and convolution, frozen parts
  forward-only, no recomputation: model FLOPs, not hardware FLOPs), divided by its samples. The analytic
  ``6 * trainable_llm_params * tokens`` estimate is reported beside it.
- **Tokens/s**: every token the LLM processes (text and visual tokens, no padding), and the supervised ones.
- **MFU** = FLOPs per sample x samples/s / peak FLOP/s. The peak is ``--peak-tflops`` when given, else measured in
  the same run by a matmul probe (the best of several ``n x n`` matmuls in the training precision's dtype).
- Data stalls: the time each measured step waited for its batch (``data_wait_s`` of ``metrics.jsonl``) and its
  share of the step time; ``--data.workers=0`` renders in the training process (the wait is then the loading's
  whole cost).
- Peak memory: the process's peak RSS and, on a GPU, the peak CUDA allocation.
- ``--profile K``: where a step's time goes — ``torch.profiler`` over one forward + backward of the counted
  micro-batch (after one untimed pass), its K ops with the most self time (ms, calls, share), in the report's
  ``profile``. On smol's ``see`` this showed LoRA dropout's masks (``aten::bernoulli_``) at 17% of a CPU step.

    python bench/train.py --out bench/results/train.json [--recipe tiny --stage joint --steps 8 --warmup 2
                          --device cuda --peak-tflops 989 --profile 12 --data.batch_size=16 --precision=bf16]

On a shared CPU the timings (and the probe) move with the other load: indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from taskmllm.model.processor import IGNORE
from taskmllm.training import train as train_module
from taskmllm.training.config import load_config
from taskmllm.training.data_loader import build_loader
from taskmllm.training.precision import DTYPES, autocast_context, resolve_precision
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

RECIPES = Path(train_module.__file__).parent / "recipes"


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Peak FLOP/s measured by ``n x n`` matmuls (best of ``repeats`` timings of 4 products)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def top_ops(step, device: torch.device, k: int) -> list[dict[str, Any]]:
    """The ``k`` ops with the most self time (CPU, and CUDA on a GPU) in one call of ``step`` under
    ``torch.profiler``: name, milliseconds, calls and share of the profiled total."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "ms": round(getattr(e, key) / 1e3, 2), "calls": e.count,
             "share": round(getattr(e, key) / total, 4)} for e in events[:k]]


def count_micro_batch(cfg, device: torch.device, precision: str, profile_ops: int = 0) -> dict[str, Any]:
    """Model FLOPs of one micro-batch's forward + backward, its samples and tokens (a fresh trainee); with
    ``profile_ops`` > 0 also the top ops of a profiled forward + backward of the same micro-batch."""
    specs = cfg.data.specs()
    trainee, _ = train_module.build_trainee(cfg, specs, device)
    trainee.joint.mllm.set_gradient_checkpointing(False)  # model FLOPs: no recomputation
    data = train_module.build_dataset(cfg, specs)
    micro = next(iter(build_loader(data, trainee.joint.mllm.processor, cfg.data.batch_size, cfg.seed, 0, 1, 0)))
    tokens = sum(int(g.batch.attention_mask.sum()) for g in micro.groups)
    supervised = sum(int((g.batch.labels[:, 1:] != IGNORE).sum()) for g in micro.groups)
    trainee.train()
    micro = micro.to(device)

    def step() -> None:
        with autocast_context(precision, device):
            loss, _ = trainee(micro)
        loss.backward()
        trainee.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    ops = top_ops(step, device, profile_ops) if profile_ops > 0 else None
    llm = trainee.joint.mllm.llm
    llm_trainable = sum(p.numel() for n, p in llm.named_parameters() if p.requires_grad and "embed" not in n)
    return {"flops": counter.get_total_flops(), "samples": micro.size, "tokens": tokens, "supervised": supervised,
            "llm_trainable": llm_trainable, "profile": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny", help="a recipe folder name under training/recipes")
    parser.add_argument("--stage", default="joint", help="the stage YAML of the recipe")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s in the training dtype (default: measured by a matmul probe)")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="report the K ops with the most self time in one profiled forward + backward")
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args()  # the rest: config overrides, e.g. --data.batch_size=8
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        total = args.warmup + args.steps
        cfg = load_config(RECIPES / args.recipe / f"{args.stage}.yaml",
                          [f"--model.init={args.recipe}", f"--out_dir={tmp}", f"--max_steps={total}",
                           f"--save_every={total}", "--progress=false", f"--device={args.device}", *overrides])
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(cfg.precision, device)
        counted = count_micro_batch(cfg, device, precision, args.profile)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        train_module.train(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        trainable = json.loads((Path(tmp) / "trainable.json").read_text())

    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device, DTYPES[precision])
    measured_s = rows[-1]["time_s"] - rows[args.warmup - 1]["time_s"] if args.warmup else rows[-1]["time_s"]
    global_batch = cfg.data.batch_size * cfg.grad_accum  # one process
    samples_per_s = args.steps * global_batch / measured_s
    per_sample = counted["flops"] / counted["samples"]
    tokens_per_sample = counted["tokens"] / counted["samples"]
    report = {
        "bench": "train", "recipe": args.recipe, "stage": cfg.stage.name, "model": f"{args.recipe} (fresh)",
        "device": str(device), "threads": torch.get_num_threads(), "precision": precision,
        "batch_size": global_batch, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "step_s": round(measured_s / args.steps, 4),
        # time blocked on the data loader per measured step (metrics.jsonl's data_wait_s), and its share of the step
        "data_wait_s": round(sum(r["data_wait_s"] for r in rows[args.warmup:]) / args.steps, 4),
        "data_wait_share": round(sum(r["data_wait_s"] for r in rows[args.warmup:]) / measured_s, 4),
        "samples_per_s": round(samples_per_s, 2),
        "tokens_per_s": round(samples_per_s * tokens_per_sample, 1),
        "supervised_tokens_per_s": round(samples_per_s * counted["supervised"] / counted["samples"], 1),
        "tokens_per_sample": round(tokens_per_sample, 1),
        "flops_per_sample": per_sample,
        "flops_per_sample_6nd_llm": 6 * counted["llm_trainable"] * tokens_per_sample,
        "peak_flops": peak, "peak_flops_source": "given" if args.peak_tflops else "matmul probe",
        "mfu": round(per_sample * samples_per_s / peak, 5),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_before_training_mib": round(rss_before / 2**20, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "trainable_params": sum(r["trainable"] for r in trainable), "total_params": sum(r["total"] for r in trainable),
        "final_loss": rows[-1]["loss_weighted"],
        "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg()[0],
    }
    if counted["profile"] is not None:
        report["profile"] = counted["profile"]
    emit(report, args.out)


if __name__ == "__main__":
    main()
