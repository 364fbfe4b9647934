"""What checkpoint verification costs at load: SHA-256 of the weight files and the NaN/inf scan, next to the
load itself, for the shipped ``tiny`` and ``smol`` (``JointModel.from_pretrained(..., verify=True)``, the default).

    python bench/checksums.py --out bench/results/checksums.json

Medians of ``--repeats`` runs per part, one thread; on a shared machine the CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def timed(fn, repeats: int) -> dict:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": round(statistics.median(walls), 4), "cpu_s": round(statistics.median(cpus), 4)}


def _scanned(path: Path, model) -> list:
    """What ``verify`` scans for NaN/inf: the experts, and the LLM's weights or, for an adapter, its own tensors
    (the base comes from installed packages)."""
    from safetensors.torch import load_file

    from taskmllm.model.adapter import ADAPTER_FILE

    experts = [e.state_dict() for e in model.experts.values()]
    if (path / ADAPTER_FILE).is_file():
        return experts + [load_file(str(path / ADAPTER_FILE))]
    return experts + [model.mllm.state_dict()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smol"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from taskmllm.model.io import CHECKSUMS_FILE, check_finite_tensors, verify_checksums
    from taskmllm.router.joint import JointModel
    from taskmllm.zoo import resolve_checkpoint

    report = {"threads": 1, "models": {}}
    for name in args.models:
        path = resolve_checkpoint(name)
        files = list(json.loads((path / CHECKSUMS_FILE).read_text())["files"])
        model = JointModel.from_pretrained(path, verify=False)
        scanned = _scanned(path, model)
        parts = {
            "load_without_verify": timed(lambda: JointModel.from_pretrained(path, verify=False), args.repeats),
            "sha256_all_weight_files": timed(lambda: verify_checksums(path, files), args.repeats),
            "finite_weights_scan": timed(lambda: [check_finite_tensors(t, path) for t in scanned], args.repeats),
            "load_with_verify": timed(lambda: JointModel.from_pretrained(path, verify=True), args.repeats),
        }
        size = sum((path / f).stat().st_size for f in files)
        checks = parts["sha256_all_weight_files"]["cpu_s"] + parts["finite_weights_scan"]["cpu_s"]
        report["models"][name] = {"weight_files_mb": round(size / 2**20, 1),
                                  "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                                  **parts, "verify_share_of_load_cpu": round(
                                      checks / parts["load_without_verify"]["cpu_s"], 3)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
