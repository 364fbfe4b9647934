"""VAR — Visual Attention Redistribution (arXiv 2503.03321), through transformers' ``AttentionInterface``.

Per layer (all but the last) and per attention **row** (one query position of one head of one sample), with
post-softmax weights ``a``:

1. sinks ``S``: key tokens whose hidden state entering the layer has ``phi(x) >= tau`` in the sink dimensions
   (:mod:`taskmllm.model.interventions.sinks`); image tokens ``I`` come from the prompt.
2. the row is image-centric when ``sum_{I} a >= min_image_attention`` and ``sum_{I \\ S} a / sum_{I} a >= rho``.
3. in an image-centric row, every sink keeps ``(1 - p)`` of its weight and the freed ``p * sum_{S} a`` is added
   to the non-sink image tokens in proportion to their weights; the row still sums to 1.

Definition of ``p``: the paper's — **p is the fraction moved** (sinks keep ``1 - p``). The official code keeps
``p`` and moves ``1 - p``; ``VAR(p=0.4)`` reproduces that code's default.

Attention is computed eagerly (weights are materialized) by a function registered once under the name
``taskmllm_var`` in ``AttentionInterface`` and (with transformers' eager mask) ``AttentionMaskInterface``. It is
stateless: during an attach, the LM's ``_attn_implementation`` is set to it (and restored on exit) and each
attention module carries the attach's state in an attribute that is deleted on exit; without that attribute
the function is plain eager attention. Sink flags are computed per forward for the new positions and kept per
layer alongside the KV cache, so cached decoding equals recomputation. ``p = 0`` leaves the model untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import HookSet, as_context, attention_module, decoder_layers, resolve_layers
from taskmllm.model.interventions.sinks import calibrate_sink_dims, check_tau, sink_flags
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

ATTN_NAME = "taskmllm_var"
STATE_ATTR = "_taskmllm_var_state"


def redistribute(weights: torch.Tensor, sinks: torch.Tensor, image: torch.Tensor, p: float, rho: float,
                 min_image_attention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply VAR to post-softmax attention weights.

    Args:
        weights: ``(B, heads, Q, K)`` attention rows.
        sinks: ``(B, K)`` bool, sink key tokens.
        image: ``(B, K)`` bool, image key tokens.
        p: fraction of the sinks' weight moved; rho, min_image_attention: the image-centric row rule.

    Returns:
        ``(new weights (B, heads, Q, K) in the input dtype, selected rows (B, heads, Q) bool)``; unselected rows
        are returned unchanged (bit for bit).
    """
    w = weights.float()
    snk, img = sinks.to(w.dtype), image.to(w.dtype)
    vns = img * (1.0 - snk)
    sums = torch.matmul(w, torch.stack([img, vns, snk], -1).unsqueeze(1))  # (B, heads, Q, 3)
    a_img, a_vns, a_snk = sums.unbind(-1)
    selected = (a_img >= min_image_attention) & (a_vns / a_img >= rho) & (a_vns > 0)
    gain = (p * a_snk / a_vns.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(-1)  # (B, heads, Q, 1)
    # factor per key: 1 - p on sinks, 1 + gain on non-sink image tokens, exactly 1 elsewhere
    factor = (1.0 - p * snk)[:, None, None, :] + vns[:, None, None, :] * gain
    new = (w * factor).to(weights.dtype)
    return torch.where(selected.unsqueeze(-1), new, weights), selected


def var_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention (as transformers' Llama eager) + VAR when ``module`` carries an attach's state.

    Shapes: query ``(B, heads, Q, d)``, key/value ``(B, kv_heads, K, d)``, mask ``(B, 1, Q, K)`` additive.
    Returns ``(output (B, Q, heads, d), weights (B, heads, Q, K))``.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    state: Optional[_VARState] = getattr(module, STATE_ATTR, None)
    if state is not None:
        weights = state.apply(module, weights)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    """Register :func:`var_attention` and the eager mask under :data:`ATTN_NAME` (idempotent, stateless)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTN_NAME, var_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


class VAR:
    """Visual Attention Redistribution: pass as ``intervention=`` to ``generate``, or ``with var.attach(...)``.

    Args:
        p: fraction of the sinks' attention moved to non-sink image tokens (paper's definition; 0 = identity).
        rho: minimum visual non-sink ratio of an image-centric row (0.5 hallucination, 0.8 general, 0.9 vision).
        tau: massive-activation threshold of a sink token (must be < sqrt(hidden size)).
        min_image_attention: minimum total attention to the image of an image-centric row.
        sink_dims: the LLM's sink dimensions; None calibrates them once per model from a few prompts
            (:func:`~taskmllm.model.interventions.sinks.calibrate_sink_dims`).
        layers: layers to apply VAR on; None = every layer but the last.

    After a generation, for inspection (from the most recent attach):
        ``sinks``: ``{layer: (B, K) bool}`` sink flags of every key position (prompt + generated);
        ``selected_heads``: ``{layer: (B, heads, Q) bool}`` image-centric rows of the last forward;
        ``selected_counts``: ``{layer: (B, heads)}`` number of rows redistributed over all forwards;
        ``sink_dims``: the dimensions used.
    """

    def __init__(self, p: float = 0.6, rho: float = 0.5, tau: float = 20.0, min_image_attention: float = 0.2,
                 sink_dims: Optional[Sequence[int]] = None, layers: Optional[Sequence[int]] = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"VAR p must be in [0, 1], got {p}")
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"VAR rho must be in [0, 1], got {rho}")
        self.p, self.rho, self.tau = float(p), float(rho), float(tau)
        self.min_image_attention = float(min_image_attention)
        self.sink_dims = None if sink_dims is None else sorted(int(d) for d in sink_dims)
        self.layer_spec = None if layers is None else list(layers)
        self._calibrated: "weakref.WeakKeyDictionary[nn.Module, list[int]]" = weakref.WeakKeyDictionary()
        self.sinks: dict[int, torch.Tensor] = {}
        self.selected_heads: dict[int, torch.Tensor] = {}
        self.selected_counts: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"VAR(p={self.p}, rho={self.rho}, tau={self.tau}, min_image_attention={self.min_image_attention}, "
                f"sink_dims={self.sink_dims})")

    def dims_for(self, model: "TaskMLLM") -> list[int]:
        """The sink dimensions for ``model``: given, or calibrated once (cached per model on this object)."""
        if self.sink_dims is not None:
            return self.sink_dims
        if model not in self._calibrated:
            self._calibrated[model] = calibrate_sink_dims(model, tau=self.tau)
        return self._calibrated[model]

    def attach(self, model: "TaskMLLM", context: Union[GenerationContext, Batch]) -> "VARSession":
        """A context manager applying VAR to ``model``'s LM for the prompt of ``context``."""
        ctx = as_context(model, context)
        check_tau(self.tau, model.hidden_size)
        return VARSession(self, model, ctx, self.dims_for(model))


class _VARState:
    """Per-attach state read by :func:`var_attention` (sink flags per layer, image mask, selections)."""

    def __init__(self, var: VAR, image_mask: torch.Tensor, layer_of: dict[int, int]) -> None:
        self.var = var
        self.image_mask = image_mask.bool()  # (B, L) prompt
        self.layer_of = layer_of  # id(attention module) -> layer index
        self.chunk_sinks: dict[int, torch.Tensor] = {}  # layer -> (B, C) flags of the current forward
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> (B, K) flags of all keys
        self.selected: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self._image_keys: Optional[torch.Tensor] = None

    def image_keys(self, length: int) -> torch.Tensor:
        """``(B, length)`` image flags of the key positions (generated positions are never image)."""
        if self._image_keys is None or self._image_keys.shape[1] < length:  # grown by doubling, sliced
            img = self.image_mask
            pad = max(length, 2 * img.shape[1]) - img.shape[1]
            self._image_keys = torch.cat([img, img.new_zeros(img.shape[0], pad)], 1)
        return self._image_keys[:, :length]

    def apply(self, module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        layer = self.layer_of[id(module)]
        q, k = weights.shape[-2], weights.shape[-1]
        chunk = self.chunk_sinks.pop(layer)
        past = k - q
        keys = chunk if past == 0 else torch.cat([self.sinks[layer][:, :past], chunk], 1)
        self.sinks[layer] = keys
        var = self.var
        new, selected = redistribute(weights, keys, self.image_keys(k), var.p, var.rho,
                                     var.min_image_attention)
        self.selected[layer] = selected
        count = selected.sum(-1)
        self.counts[layer] = count if layer not in self.counts else self.counts[layer] + count
        return new


class VARSession(contextlib.AbstractContextManager):
    """One VAR attach: attention implementation switched, sink hooks installed; all undone on exit."""

    def __init__(self, var: VAR, model: "TaskMLLM", ctx: GenerationContext, dims: list[int]) -> None:
        self.var = var
        self.model = model
        self.dims = dims
        layers = decoder_layers(model.llm)
        spec = var.layer_spec if var.layer_spec is not None else list(range(len(layers) - 1))
        self.layers = [i for i in resolve_layers(spec, len(layers)) if i != len(layers) - 1]  # never the last
        self.decoder_layers = layers
        self.attn = {i: attention_module(layers[i]) for i in self.layers}
        self.state = _VARState(var, ctx.image_mask, {id(m): i for i, m in self.attn.items()})
        self.hooks = HookSet()
        self._previous: Optional[str] = None

    def __enter__(self) -> "VARSession":
        try:
            for i in self.layers:
                self.hooks.forward_pre(self.decoder_layers[i], self._sink_hook(i), with_kwargs=True)
            if self.var.p > 0 and self.layers:
                _register()
                self._previous = self.model.llm.config._attn_implementation
                self.model.llm.set_attn_implementation(ATTN_NAME)
                for module in self.attn.values():
                    setattr(module, STATE_ATTR, self.state)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self.var.sinks = dict(self.state.sinks)
        self.var.selected_heads = dict(self.state.selected)
        self.var.selected_counts = dict(self.state.counts)
        return None

    def _close(self) -> None:
        for module in self.attn.values():
            if hasattr(module, STATE_ATTR):
                delattr(module, STATE_ATTR)
        if self._previous is not None:
            self.model.llm.set_attn_implementation(self._previous)
            self._previous = None
        self.hooks.remove()

    def _sink_hook(self, layer: int):
        tau, state = self.var.tau, self.state
        dims = torch.as_tensor(self.dims, dtype=torch.long, device=self.model.device)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, C, H) entering the layer
            flags = sink_flags(hidden, dims, tau)
            if self.var.p > 0:
                state.chunk_sinks[layer] = flags
            else:  # identity: attention untouched, sinks still recorded for inspection
                # the decoder layer's cache argument: `cache` from transformers 5.24, `past_key_values` before
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = cache.get_seq_length(layer) if cache is not None and layer in state.sinks else 0
                state.sinks[layer] = flags if past == 0 else torch.cat([state.sinks[layer][:, :past], flags], 1)
            return None

        return hook
