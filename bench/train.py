"""Training throughput of the tiny recipe's ``joint`` stage: samples/s and peak memory, as JSON.

Runs the real training loop (:func:`taskmllm.training.train.train`) on a fresh tiny model with the recipe's
data settings (96 px, 8 frames, batch 16 unless overridden), one process. Samples/s is measured over the steps
after ``--warmup`` from the per-step clock of ``metrics.jsonl``; the breakdown splits those steps into data
(ShapesWorld sampling), forward (processor + joint forward + losses), optimizer step, and the rest (backward,
clipping, logging). Peak memory is the process's peak RSS (``ru_maxrss``), also given above the RSS measured
just before training (imports and libraries), and the peak CUDA allocation when on a GPU.

    python bench/train.py --out bench/results/train.json [--steps 8 --warmup 2 --threads 1 --data.batch_size=8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from taskmllm.training import train as train_module
from taskmllm.training.config import load_config
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

RECIPE = Path(train_module.__file__).parent / "recipes" / "tiny"


class PhaseClock:
    """Seconds per phase of the training steps after the warm-up: wraps the loop's ``micro_batch`` and
    ``forward_loss`` and times optimizer steps with torch's global optimizer hooks."""

    def __init__(self, warmup_steps: int, grad_accum: int) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.warmup_micro_batches, self.warmup_steps = warmup_steps * grad_accum, warmup_steps
        self.micro_batches = self.steps = 0
        self._opt_start = 0.0

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.micro_batches >= self.warmup_micro_batches:
                    self.seconds[phase] += time.perf_counter() - start
                self.micro_batches += phase == "forward"
        return wrapper

    def optimizer_pre(self, *_) -> None:
        self._opt_start = time.perf_counter()

    def optimizer_post(self, *_) -> None:
        if self.steps >= self.warmup_steps:
            self.seconds["optimizer"] += time.perf_counter() - self._opt_start
        self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args()  # the rest: config overrides, e.g. --data.batch_size=8
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        total = args.warmup + args.steps
        cfg = load_config(RECIPE / "joint.yaml", ["--model.init=tiny", f"--out_dir={tmp}", f"--max_steps={total}",
                                                  f"--save_every={total}", "--progress=false",
                                                  f"--device={args.device}", *overrides])
        clock = PhaseClock(args.warmup, cfg.grad_accum)
        patched = {"micro_batch": train_module.micro_batch, "forward_loss": train_module.forward_loss}
        train_module.micro_batch = clock.timed("data", patched["micro_batch"])
        train_module.forward_loss = clock.timed("forward", patched["forward_loss"])
        hooks = [register_optimizer_step_pre_hook(clock.optimizer_pre),
                 register_optimizer_step_post_hook(clock.optimizer_post)]
        rss_before = psutil.Process().memory_info().rss
        try:
            train_module.train(cfg)
        finally:
            for name, fn in patched.items():
                setattr(train_module, name, fn)
            for hook in hooks:
                hook.remove()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        trainable = json.loads((Path(tmp) / "trainable.json").read_text())

    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda")
                                       and torch.cuda.is_bf16_supported())
    precision = "bf16" if bf16 else "fp32"
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    measured_s = rows[-1]["time_s"] - rows[args.warmup - 1]["time_s"] if args.warmup else rows[-1]["time_s"]
    global_batch = cfg.data.batch_size * cfg.grad_accum  # one process
    phases = dict(clock.seconds)
    phases["backward_and_other"] = max(0.0, measured_s - sum(phases.values()))
    report = {
        "bench": "train", "stage": cfg.stage.name, "model": "tiny (fresh)",
        "device": device, "threads": torch.get_num_threads(),
        "batch_size": global_batch, "sources": cfg.data.sources,
        "precision": precision, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "samples_per_s": round(args.steps * global_batch / measured_s, 2),
        "step_s": round(measured_s / args.steps, 4),
        "step_breakdown_s": {k: round(v / args.steps, 4) for k, v in phases.items()},
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "peak_rss_above_start_mib": round((peak_rss - rss_before) / 2**20, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "trainable_params": sum(r["trainable"] for r in trainable), "total_params": sum(r["total"] for r in trainable),
        "final_loss": rows[-1]["loss_weighted"],
        "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg()[0],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
