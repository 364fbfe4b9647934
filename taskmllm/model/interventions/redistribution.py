"""VAR's row rule and redistribution on post-softmax attention weights (pure tensor functions; the module table
of :mod:`taskmllm.model.interventions.var` says what each mode selects). :func:`redistribute` takes sink and image
flags; :func:`redistribute_on_basis` takes their :func:`key_basis`, which VAR's decoding keeps from step to step."""

from __future__ import annotations

from typing import Optional

import torch

from taskmllm.errors import ConfigError

MODES = ("official", "paper")
OFFICIAL_EPS = 1e-6  # the official code adds 1e-6 per image token to the visual-sink share's denominator


def key_basis(sinks: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool sink and image flags -> ``(B, K, 4)`` float32 columns: image ``I``, non-sink image
    ``I \\ S``, sink ``S``, visual sink ``I & S`` (one matmul with the weights gives every row's four sums)."""
    return torch.stack([image, image & ~sinks, sinks, image & sinks], -1).float()


def redistribute(weights: torch.Tensor, sinks: torch.Tensor, image: torch.Tensor, p: float, rho: float,
                 min_image_attention: float, mode: str = "paper", rows: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply VAR's row rule and redistribution to post-softmax attention weights.

    Args:
        weights: ``(B, heads, Q, K)`` attention rows.
        sinks: ``(B, K)`` bool, sink key tokens.
        image: ``(B, K)`` bool, image key tokens.
        p: fraction of the sinks' weight moved; rho, min_image_attention: the row rule of ``mode`` (module table).
        mode: ``"official"`` (visual-sink gate, ``sum_{I&S} a / (sum_I a + 1e-6 |I|) <= 1 - rho``) or ``"paper"``
            (``sum_{I\\S} a / sum_I a >= rho``).
        rows: ``(B, Q)`` bool, rows allowed to change (official mode: after the image); None = all.

    Returns:
        ``(new weights (B, heads, Q, K) in the input dtype, selected rows (B, heads, Q) bool)``; unselected rows
        are returned unchanged (bit for bit).
    """
    if mode not in MODES:
        raise ConfigError(f"VAR mode must be one of {list(MODES)}, got {mode!r}")
    official = mode == "official"
    gate = (sinks & image).any(-1)[:, None, None] if official else None  # (B, 1, 1): a visual sink in this layer
    image_eps = OFFICIAL_EPS * image.sum(-1).float()[:, None, None] if official else None
    return redistribute_on_basis(weights, key_basis(sinks, image), p, rho, min_image_attention, gate, image_eps, rows)


def redistribute_on_basis(weights: torch.Tensor, basis: torch.Tensor, p: float, rho: float, min_image_attention: float,
                          gate: Optional[torch.Tensor], image_eps: Optional[torch.Tensor], rows: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`redistribute` on a :func:`key_basis` ``(B, K, 4)``; official mode when ``gate`` ``(B, 1, 1)`` and
    ``image_eps`` ``(B, 1, 1)`` (``OFFICIAL_EPS`` times the sample's image tokens) are given.

    It runs in every decode step of every changed layer, where each kernel's dispatch costs more than its
    arithmetic, so it keeps to ~20 kernels (the paper rule's ``a_vns > 0`` is tested only when ``rho <= 0``: with
    ``rho > 0`` the ratio test implies it)."""
    w = weights if weights.dtype == torch.float32 else weights.float()
    bsz, heads, q_len, k_len = w.shape
    flat = w.reshape(bsz, heads * q_len, k_len)  # a view of a contiguous softmax output
    # one batched GEMM per sample over all heads' rows: (B, heads * Q, K) @ (B, K, 4)
    a_img, a_vns, a_snk, a_vsink = torch.bmm(flat, basis).view(bsz, heads, q_len, 4).unbind(-1)  # (B, heads, Q)
    tiny = torch.finfo(torch.float32).tiny
    if gate is not None:
        portion = a_vsink / (a_img + image_eps).clamp_min(tiny)
        selected = gate & (a_img >= min_image_attention) & (portion <= 1.0 - rho) & (a_vns > 0)
    else:
        selected = (a_img >= min_image_attention) & (a_vns / a_img >= rho)  # 0 / 0 is NaN: never >= rho
        if rho <= 0:
            selected = selected & (a_vns > 0)
    if rows is not None:
        selected = selected & rows[:, None, :]
    gain = p * a_snk / a_vns.clamp_min(tiny)
    # per selected row: + gain on non-sink image keys, - p on sinks; 0 on the others, which stay exactly as they were
    coef = torch.stack((torch.where(selected, gain, 0.0), selected * -p), -1).view(bsz, heads * q_len, 2)
    delta = torch.bmm(coef, basis[..., 1:3].transpose(1, 2))  # (B, heads * Q, K)
    new = torch.addcmul(flat, flat, delta).view(bsz, heads, q_len, k_len)
    return (new if weights.dtype == torch.float32 else new.to(weights.dtype)), selected
