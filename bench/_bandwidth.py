"""The machine's memory-read bandwidth, measured by the benchmark itself: a large-array read probe.

A decode step of a small-batch LLM reads every weight once; tokens/s can therefore not exceed
``bandwidth / weight bytes``. Benchmarks report their speed as a fraction of that bound instead of assuming it.
"""

from __future__ import annotations

import os
import time

import torch


def read_bandwidth(megabytes: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Best GB/s of reading a ``megabytes`` float32 array (larger than any cache) on ``device`` (the CPU with
    torch's threads, or a GPU's memory): the best of ``x.sum()`` and, on the CPU, of an inductor-compiled sum of
    its rows (the access pattern of the compiled decode step's weight reads). At two threads on the project's
    host the two read 43-50 and 45-78 GB/s in different runs, and the compiled decode step's products once read
    61 GB/s where ``x.sum()`` read 50: one probe alone can understate the bound."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    probes = [x.sum]
    if torch.device(device).type == "cpu":
        rows = torch.compile(lambda t: t.view(-1, 4096).sum(1), dynamic=False)
        probes.append(lambda: rows(x))
    best = float("inf")
    for probe in probes:
        probe()  # touch every page once (and compile)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            probe()
            sync(device)
            best = min(best, time.perf_counter() - start)
    return round(x.numel() * 4 / best / 1e9, 2)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall-clock timers measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on: the device (with the GPU's name), torch threads, CPUs, the load average
    when the bench started."""
    out = {"device": device}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return {**out, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer once (a tied tensor once: an LM head
    that is the input embedding), except an embedding table no other layer uses (a step reads one row of it, e.g.
    beside an int8-quantized LM head). Quantized layers count their int8 weights and scales."""
    tensors: dict[int, torch.Tensor] = {}
    read: set[int] = set()
    for layer in module.modules():
        for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            tensors[id(t)] = t
            if not isinstance(layer, torch.nn.Embedding):
                read.add(id(t))
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i in read)
