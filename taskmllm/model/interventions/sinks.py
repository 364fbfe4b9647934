"""Attention-sink tokens by massive activation, and automatic calibration of a model's sink dimensions.

A token's sink value entering a layer is ``phi(x) = max_{d in D_sink} |x[d] / RMS(x)|`` (VAR, arXiv 2503.03321);
the token is a sink when ``phi >= tau`` (:func:`sink_flags`, VAR's paper mode) or, as the official code computes it,
``|x[d]| * rsqrt(mean(x^2) + 1e-6) > tau`` in float32 (:func:`sink_flags_official`). Note
``|x[d]| / RMS(x) <= sqrt(hidden_size)``, so ``tau`` must be below ``sqrt(hidden_size)`` (the paper's tau = 20 needs
a hidden size above 400); :func:`default_tau` is the paper's 20 capped at half of ``sqrt(hidden_size)``, so that
a default works on any model (20 on LLaMA-2-7B, 8 on the 256-wide ``tiny``, 12 on SmolLM2-135M).

``D_sink`` depends on the base LLM (LLaMA-2-7B {1415, 2533}, Qwen2-7B {458, 2570}); :func:`calibrate_sink_dims`
finds it: it runs a few prompts, takes every token's ``|x| / RMS(x)`` per dimension entering every layer, and
keeps the dimensions that reach ``tau`` in at least ``min_fraction`` of the prompts (massive activations are
few, huge and consistent across inputs — typically on the BOS token and delimiters).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.interventions.hooks import HookSet, decoder_layers

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

CALIBRATION_PROMPTS = (
    "Describe the image in detail.",
    "Is there a red circle in the image?",
    "How many objects are there?",
    "What is the color of the largest shape?",
    "Write one sentence about the weather today.",
)


def activation_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """``(..., H)`` hidden states -> ``(..., H)`` ``|x[d]| / RMS(x)`` in float32."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return x.abs() / rms


def sink_values(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``(..., H)`` -> ``(...)`` ``phi(x) = max_{d in dims} |x[d]| / RMS(x)`` (zeros when ``dims`` is empty)."""
    if len(dims) == 0:
        return hidden.new_zeros(hidden.shape[:-1], dtype=torch.float32)
    x = hidden.float()
    rms = x.pow(2).mean(-1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    idx = torch.as_tensor(list(dims), device=hidden.device)
    return x.index_select(-1, idx).abs().amax(-1) / rms


def sink_flags(hidden: torch.Tensor, dims: Union[Sequence[int], torch.Tensor], tau: float) -> torch.Tensor:
    """``(..., H)`` -> ``(...)`` bool ``phi(x) >= tau``, computed as ``max_d x[d]^2 >= max(tau^2 * mean(x^2), t)``
    with ``t`` the smallest normal float32 (so a zero vector is no sink): no square root or division, ~6 kernels
    for one sink dimension given as a list — paper-mode VAR runs it on every new position of every changed layer."""
    if len(dims) == 0:
        return torch.zeros(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    sq = (hidden if hidden.dtype == torch.float32 else hidden.float()).square()
    if not isinstance(dims, torch.Tensor) and len(dims) == 1:
        peak = sq.select(-1, dims[0])
    else:
        idx = dims if isinstance(dims, torch.Tensor) else torch.as_tensor(list(dims), device=hidden.device)
        peak = sq.index_select(-1, idx).amax(-1)
    return peak >= ((tau * tau) * sq.mean(-1)).clamp_min(torch.finfo(torch.float32).tiny)


def sink_flags_official(hidden: torch.Tensor, dims: Union[Sequence[int], torch.Tensor], tau: float) -> torch.Tensor:
    """``(..., H)`` -> ``(...)`` bool, the official VAR code's test: ``max_d |x[d] * rsqrt(mean(x^2) + 1e-6)| > tau``
    in float32 (strict; the epsilon makes a zero vector no sink)."""
    if len(dims) == 0:
        return torch.zeros(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    idx = dims if isinstance(dims, torch.Tensor) else torch.as_tensor(list(dims), device=hidden.device)
    return normed.index_select(-1, idx.to(hidden.device)).abs().amax(-1) > tau


def default_tau(hidden_size: int) -> float:
    """VAR's sink threshold for a model: the published 20, capped at half of ``sqrt(hidden_size)`` (reachable)."""
    return min(20.0, 0.5 * math.sqrt(hidden_size))


def check_tau(tau: float, hidden_size: int) -> None:
    """Raise :class:`ConfigError` when no token can reach ``tau`` (``phi <= sqrt(hidden_size)``)."""
    if tau >= math.sqrt(hidden_size):
        raise ConfigError(f"VAR tau={tau} cannot be reached: |x[d]|/RMS(x) <= sqrt(hidden_size) = "
                          f"{math.sqrt(hidden_size):.1f} for this model; use a smaller tau (or tau=None: "
                          f"{default_tau(hidden_size):.1f})")


def calibration_batch(model: "TaskMLLM", prompts: Optional[Sequence[str]] = None, seed: int = 0):
    """A batch of calibration prompts, each with a random image when the model has a vision tower."""
    prompts = list(prompts or CALIBRATION_PROMPTS)
    rng = np.random.default_rng(seed)
    size = model.config.vision.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if i % 2 == 0 else None
              for i in range(len(prompts))]
    return model.processor(prompts, images)


@torch.no_grad()
def peak_activation_ratios(model: "TaskMLLM", batch) -> torch.Tensor:
    """``(B, H)``: per prompt and dimension, the max of ``|x[d]| / RMS(x)`` over real tokens and layers."""
    layers = decoder_layers(model.llm)
    mask = batch.attention_mask.to(model.device).bool()
    peaks: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ratio = activation_ratio(hidden).masked_fill(~mask[..., None], 0.0)  # (B, L, H)
        peaks.append(ratio.amax(1))

    hooks = HookSet()
    try:
        for layer in layers:
            hooks.forward_pre(layer, hook, with_kwargs=True)
        model(batch.to(model.device))
    finally:
        hooks.remove()
    return torch.stack(peaks).amax(0)


def calibrate_sink_dims(model: "TaskMLLM", prompts: Optional[Sequence[str]] = None, tau: float = 20.0,
                        min_fraction: float = 0.5, max_dims: int = 8, batch=None) -> list[int]:
    """Find the model's sink dimensions from a few prompts (see the module docstring for the rule).

    Args:
        model: the TaskMLLM.
        prompts: calibration prompts (default :data:`CALIBRATION_PROMPTS`, half with a random image).
        tau: the massive-activation threshold of VAR.
        min_fraction: a dimension must reach ``tau`` in at least this fraction of the prompts.
        max_dims: keep at most this many dimensions (largest mean peak first).
        batch: a ready :class:`~taskmllm.model.processor.Batch` to use instead of ``prompts``.

    Returns:
        Sorted dimension indices (empty when the model has no massive activations at ``tau``).
    """
    check_tau(tau, model.hidden_size)
    batch = batch if batch is not None else calibration_batch(model, prompts)
    peaks = peak_activation_ratios(model, batch)  # (B, H)
    fraction = (peaks >= tau).float().mean(0)
    candidates = (fraction >= min_fraction).nonzero().flatten()
    order = peaks.mean(0)[candidates].argsort(descending=True)
    return sorted(candidates[order][:max_dims].tolist())
