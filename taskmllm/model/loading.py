"""Loading at scale: modules built without random initialisation, weights read straight into the target dtype.

:func:`empty_module` builds a module with every parameter on the meta device (``accelerate.init_empty_weights``:
no memory, no initialisation; buffers stay real, so computed ones such as rotary frequencies are right).
:func:`load_weights` then reads a safetensors file tensor by tensor onto the requested device, casts each floating
tensor to the requested dtype and puts it in place (tied parameters stay one parameter). At no point does a float32
copy of the model exist when another dtype is asked for: the peak is the model in that dtype plus one tensor as
stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
Device = Union[str, torch.device]


def empty_module(build: Callable[[], M]) -> M:
    """``build()`` with its parameters on the meta device (no memory, no random initialisation)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def load_weights(module: nn.Module, path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                 device: Device = "cpu") -> tuple[list[str], list[str]]:
    """Fill ``module``'s parameters and persistent buffers from the safetensors file ``path``: each tensor read onto
    ``device`` and, if floating, cast to ``dtype`` (None: as stored), then assigned in place of the module's (meta or
    not). Names that share one parameter (tied weights) get one tensor, stored under any of them. The other buffers
    move to ``device``. Returns ``(missing, unexpected)`` state names, like ``load_state_dict``.

    Raises:
        safetensors.SafetensorError, OSError: the file cannot be read (the caller names it).
    """
    from safetensors import safe_open

    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    params = {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}
    expected = set(module.state_dict().keys())
    buffers = sorted(expected - {n for names in groups.values() for n in names})
    missing: list[str] = []
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        stored = set(f.keys())
        for pid, names in groups.items():
            key = next((n for n in names if n in stored), None)
            if key is None:
                missing += names
                continue
            value = nn.Parameter(_cast(f.get_tensor(key), dtype), requires_grad=params[pid].requires_grad)
            for name in names:
                _set(module, name, value, parameter=True)
        for name in buffers:
            if name in stored:
                _set(module, name, _cast(f.get_tensor(name), dtype), parameter=False)
            else:
                missing.append(name)
    if missing:
        _retie(module, missing)
        missing = [n for n in missing if _get(module, n).is_meta]
    if not missing:
        module.to(device)  # non-persistent buffers (computed at construction)
    return sorted(missing), sorted(stored - expected)


def _retie(module: nn.Module, missing: list[str]) -> None:
    """Tie what transformers models tie (an output embedding is the input embedding): building on the meta device
    makes the tied names two parameters, and a checkpoint stores one of them (transformers' ``tie_weights`` with the
    missing names ties to the one that was read)."""
    from transformers import PreTrainedModel

    for prefix, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            start = f"{prefix}." if prefix else ""
            sub.tie_weights(missing_keys={n[len(start):] for n in missing if n.startswith(start)})


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return getattr(owner, attr)


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _set(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if parameter:
        owner.register_parameter(attr, value)  # replaces the existing (meta) parameter of that name
    else:
        owner.register_buffer(attr, value)
