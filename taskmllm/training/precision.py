"""Explicit training precision: ``precision: auto | fp32 | bf16 | fp16`` of a stage.

``auto`` resolves once, before anything is built: bf16 on a CUDA device that supports it, fp32 otherwise. The
resolved value then decides everything:

- plain torch and DDP run the forward under ``torch.autocast`` (bf16 or fp16; nothing for fp32) with fp32
  weights and optimizer state; fp16 adds a ``torch.amp.GradScaler`` (dynamic loss scaling);
- DeepSpeed gets ``bf16.enabled`` / ``fp16.enabled`` written into its config as booleans (the engine then holds
  the weights in that dtype and fp32 master copies in its optimizer) and no autocast. Raw DeepSpeed does not
  resolve the HF Trainer's ``"auto"`` values, so a config that still holds one is refused by name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from taskmllm.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device with bf16 support, else ``fp32``; other values unchanged.

    Raises:
        ConfigError: an unknown precision, or fp16 on a CPU (no fp16 matrix kernels worth training with).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return precision


def autocast_context(precision: str, device: torch.device,
                     engine_casts: bool = False) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the resolved ``precision`` (nothing for fp32, or when the engine holds the weights in
    that dtype itself: ``engine_casts``, DeepSpeed with bf16/fp16 enabled)."""
    if precision == "fp32" or engine_casts:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A dynamic loss scaler for fp16 autocast (None otherwise: bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def deepspeed_precision(ds_config: dict[str, Any], precision: str) -> dict[str, Any]:
    """``ds_config`` with ``bf16.enabled`` / ``fp16.enabled`` set as booleans from the resolved ``precision`` (other
    keys of those sections, e.g. fp16's loss-scale settings, are kept); returns a new dict.

    Raises:
        ConfigError: a value of the config is still the string ``"auto"`` (its path is named).
    """
    out = dict(ds_config)
    for key, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        section = dict(out.get(key) or {})
        section["enabled"] = precision == dtype
        out[key] = section
    for path in _auto_values(out):
        raise ConfigError(f"deepspeed config: {path} is \"auto\"; raw DeepSpeed does not resolve \"auto\" (only the "
                          "HF Trainer does): write the value, or drop the key to use DeepSpeed's default")
    return out


def _auto_values(node: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of every ``"auto"`` string in a nested config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_values(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _auto_values(v, f"{path}[{i}]")
    elif node == "auto":
        yield path
