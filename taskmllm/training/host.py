"""What a training time was measured on: the host's CPU and its vector instructions, cores, threads and load.

The same recipe takes 3.2 s per `see` step of `smol` on one 2-core host (AVX-512 with BF16) and 4.3 s on another
(AVX2 only): a wall time means little without the machine. :func:`describe_host` is recorded beside every stage
time in a recipe run's ``recipe.json``; :func:`host_label` is how the model card names it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``; elsewhere ``platform.processor()`` or the architecture)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_host(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The host as a JSON-able dict: ``cpu`` (model name), ``isa`` (the vector instructions torch's CPU kernels use:
    ``AVX2``, ``AVX512``, ...), ``cpus`` (logical CPUs), ``threads`` (torch's intra-op threads), ``gpu`` (the CUDA
    device's name when ``device`` is one, or is ``"auto"`` on a machine with CUDA, as a training config resolves
    it) and ``load_avg_1min`` (other work on the machine when it was read)."""
    out: dict[str, Any] = {"cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(),
                           "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():  # else the training's own check says so
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    out["load_avg_1min"] = load_average()
    return out


def load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine), or None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def host_label(host: Mapping[str, Any]) -> str:
    """``"AMD EPYC (AVX2), 2 CPUs, 2 torch threads"`` (+ the GPU): the machine, without its momentary load."""
    text = f"{host.get('cpu', 'unknown CPU')} ({host.get('isa', '?')}), {host.get('cpus', '?')} CPUs, " \
           f"{host.get('threads', '?')} torch threads"
    return text + (f", GPU {host['gpu']}" if host.get("gpu") else "")


def hosts_text(stage_hosts: Sequence[Optional[Mapping[str, Any]]]) -> str:
    """How a card names the machines its stages ran on: ``"on <label> (1-minute load average 2.0-2.3 at the stages'
    starts and ends)"``, or each stage's label when they differ; "on the machine that ran it" for runs recorded
    before hosts were."""
    known = [h for h in stage_hosts if h]
    if not known:
        return "on the machine that ran it"
    labels = list(dict.fromkeys(host_label(h) for h in known))
    loads = [v for h in known for v in (h.get("load_avg_1min"), h.get("load_avg_end")) if v is not None]
    load = f" (1-minute load average {min(loads):.1f}–{max(loads):.1f} at the stages' starts and ends)" if loads else ""
    missing = " and one not recorded" if len(known) < len(stage_hosts) else ""
    if len(labels) == 1:
        return f"on {labels[0]}{missing}{load}"
    return f"on {len(labels)} machines: {'; '.join(labels)}{missing}{load}"
