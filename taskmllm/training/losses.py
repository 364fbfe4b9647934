"""Weights and sums the training losses: LM cross-entropy, expert terms and the auxiliary losses
(``taskmllm.training.aux``, already paired with their weights).

Experts already weight their own terms (e.g. ``2·L1 + GIoU/5``); a stage adds one weight per expert
(``stage.expert_weights[name]``, default 1) and one LM weight (``stage.lm_weight``). Expert term names are
prefixed with the expert's name (``seg_bce``, ``det_giou``), which is how a term finds its expert.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch

from taskmllm.errors import ConfigError


def expert_of(term: str, experts: Sequence[str]) -> str:
    """The expert a loss term belongs to (longest name that prefixes ``term``)."""
    owners = [e for e in experts if term == e or term.startswith(e + "_")]
    if not owners:
        raise ConfigError(f"loss term {term!r} does not start with an expert name of {list(experts)}")
    return max(owners, key=len)


def check_expert_names(key: str, names: Iterable[str], experts: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if ``names`` (the value of stage option ``key``) has a name not in ``experts``."""
    unknown = sorted(set(names) - set(experts))
    if unknown:
        raise ConfigError(f"{key} names unknown experts {unknown}; experts: {list(experts)}")


def total_loss(lm_loss: torch.Tensor, expert_losses: Mapping[str, torch.Tensor], experts: Sequence[str],
               lm_weight: float = 1.0, expert_weights: Optional[Mapping[str, float]] = None,
               extra: Optional[Mapping[str, tuple[float, torch.Tensor]]] = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``lm_weight·LM + Σ_e w_e·Σ terms_e + Σ w·extra`` and the parts for logging, detached on the loss's device
    (read only at the logging interval: nothing here waits for the device). The names in ``expert_weights`` are
    checked once before training (:func:`check_expert_names`)."""
    weights = dict(expert_weights or {})
    total = lm_loss * lm_weight
    parts = {"lm": lm_loss.detach()}
    for term, value in expert_losses.items():
        w = weights.get(expert_of(term, experts), 1.0)
        if w:
            total = total + w * value
        parts[term] = value.detach()
    for name, (w, value) in (extra or {}).items():
        if w:
            total = total + w * value
        parts[name] = value.detach()
    return total, parts
