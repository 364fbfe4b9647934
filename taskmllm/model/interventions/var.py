"""VAR — Visual Attention Redistribution (arXiv 2503.03321; official code seilk/VisAttnSink), in two modes.

Both modes act on post-softmax attention rows (one query position of one head of one sample). Sinks ``S`` are key
tokens whose hidden state entering the layer has a massive activation in the model's sink dimensions
(:mod:`taskmllm.model.interventions.sinks`); ``I`` are the prompt's image tokens. In a **selected** row every sink
keeps ``(1 - p)`` of its weight and the freed ``p * sum_S a`` goes to the non-sink image tokens ``I \\ S`` in
proportion to their weights; the row still sums to 1. A row with no attention on ``I \\ S`` is never selected.

One convention for both modes: ``p`` is the fraction **moved** and ``rho`` the minimum **non-sink** share of the
row's image attention (the paper's). The official code keeps ``p_code`` and bounds the visual-sink share by
``rho_code``: ``p_code = 1 - p``, ``rho_code = 1 - rho`` (VisAttnSink issue #5). Side by side:

=================  ==================================================  ==============================================
\\                  ``mode="official"`` (default; the code's behaviour)  ``mode="paper"`` (the paper's text)
=================  ==================================================  ==============================================
sink test          ``|x_d| * rsqrt(mean(x^2) + 1e-6) > tau`` (float32)  ``|x_d| / RMS(x) >= tau``
sinks found        once, in the prefill, among the prompt's tokens;    in every forward for the new positions
                   reused while decoding (no generated token is one)   (a generated token can be a sink)
default layers     ``2 .. N-1``, the last included (the code detects   ``0 .. N-2`` (the paper: never the last; the
                   sinks from layer 2; its except-last flag is         last layer is never changed in this mode)
                   shadowed, so the last layer is changed)
layer gate         a sample's layer is untouched unless one of its     none
                   sinks lies inside its image (a *visual* sink)
rows               only query positions after the sample's last image  every row
                   token (the prefill's rows after the image, every
                   decode row)
row rule           ``sum_I a >= min_image_attention`` and              ``sum_I a >= min_image_attention`` and
                   ``sum_{I&S} a / (sum_I a + 1e-6 |I|) <= 1 - rho``   ``sum_{I\\S} a / sum_I a >= rho``
default ``p``      0.4 (the code keeps 0.6)                            0.6
=================  ==================================================  ==============================================

With only a first-token sink (BOS, ``<|im_start|>``) official mode changes nothing; paper mode moves the BOS
attention onto the image.

``tau=None`` (default) resolves per model at attach: :func:`~taskmllm.model.interventions.sinks.default_tau`
(20 capped at half of ``sqrt(hidden size)``); an explicit ``tau`` at or above ``sqrt(hidden size)`` raises
:class:`ConfigError` at attach. ``sink_dims=None`` calibrates the dimensions once per model and tau.

Attention backend: during an attach the LM's attention implementation is switched (and restored on exit) to a
function registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``: ``taskmllm_var_sdpa``
on an SDPA model (SDPA's masks; a layer VAR cannot change in this forward — not configured, or official mode with
no visual sink in the batch — runs SDPA itself, bit-identical to the model without VAR) and ``taskmllm_var``
otherwise (eager masks). Where VAR may change rows, attention is computed eagerly (weights materialized). The
functions are stateless: each configured attention module carries the attach's state in an attribute deleted on
exit. ``p = 0`` leaves the model untouched (sinks are still recorded for inspection).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.attention import float32_decode_sdpa, is_sdpa
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import HookSet, as_context, attention_module, decoder_layers, resolve_layers
from taskmllm.model.interventions.masks import additive_mask
from taskmllm.model.interventions.redistribution import MODES, OFFICIAL_EPS, key_basis, redistribute_on_basis
from taskmllm.model.interventions.sinks import (calibrate_sink_dims, check_tau, default_tau, sink_flags,
                                                sink_flags_official)
from taskmllm.model.interventions.validation import check_choice, check_index_list, check_number, check_settings
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

ATTN_NAME = "taskmllm_var"
ATTN_NAME_SDPA = "taskmllm_var_sdpa"
STATE_ATTR = "_taskmllm_var_state"
DEFAULT_P = {"official": 0.4, "paper": 0.6}


def _attention(fallback: Optional[Any], module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
               **kwargs):
    """Eager attention (as transformers' Llama eager) + VAR where ``module`` carries an attach's state that may
    change rows; otherwise ``fallback`` (SDPA) when given.

    Shapes: query ``(B, heads, Q, d)``, key/value ``(B, kv_heads, K, d)``, mask 4D (see :func:`additive_mask`).
    Returns ``(output (B, Q, heads, d), weights (B, heads, Q, K) or None)``.
    """
    state: Optional[_VARState] = getattr(module, STATE_ATTR, None)
    if fallback is not None and (state is None or not state.may_change(module)):
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: copies as transformers' eager (same bits)
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    # an SDPA model passes no mask where causality is all there is: one query (decoding) then sees every key
    if attention_mask is not None or (fallback is not None and query.shape[2] > 1):
        weights = weights + additive_mask(attention_mask, query.shape[2], key.shape[2], weights.dtype, weights.device)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if state is not None and state.may_change(module):
        weights = state.apply(module, weights)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def var_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs):
    """``taskmllm_var``: eager attention + VAR (eager masks). Shapes as :func:`_attention`."""
    return _attention(None, module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def var_attention_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs):
    """``taskmllm_var_sdpa``: SDPA where VAR cannot change rows (``taskmllm_sdpa``: transformers' SDPA, a
    half-precision decode step on the CPU in float32), else eager attention + VAR (SDPA masks)."""
    return _attention(float32_decode_sdpa, module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register(previous: Optional[str]) -> str:
    """Register the VAR attention functions (idempotent, stateless); the name to use after ``previous``."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    AttentionInterface.register(ATTN_NAME, var_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)
    AttentionInterface.register(ATTN_NAME_SDPA, var_attention_sdpa)
    AttentionMaskInterface.register(ATTN_NAME_SDPA, sdpa_mask)
    return ATTN_NAME_SDPA if is_sdpa(previous) else ATTN_NAME


class VAR:
    """Visual Attention Redistribution: pass as ``intervention=`` to ``generate``, or ``with var.attach(...)``.

    Args:
        p: fraction of the sinks' attention moved to non-sink image tokens (0 = identity); None = the mode's
            default (official 0.4, paper 0.6).
        rho: minimum non-sink share of an image-centric row's image attention (paper: 0.5 hallucination, 0.8
            general, 0.9 vision-centric); the official code's ``rho_code`` is ``1 - rho``.
        tau: massive-activation threshold of a sink token (> 0 and < sqrt(hidden size)); None = per model at
            attach, :func:`~taskmllm.model.interventions.sinks.default_tau`.
        min_image_attention: minimum total attention to the image of an image-centric row (0.2 in both).
        sink_dims: the LLM's sink dimensions; None calibrates them once per model and tau.
        layers: layers to apply VAR on (negative indices allowed); None = the mode's default (module table).
        mode: ``"official"`` (default) or ``"paper"``; see the module docstring.

    Raises:
        ConfigError: a setting of the wrong type or out of range (named with its value).

    After a generation, for inspection (from the most recent attach):
        ``sinks``: ``{layer: (B, K) bool}`` sink flags of every key position (prompt + generated);
        ``selected_heads``: ``{layer: (B, heads, Q) bool}`` selected rows of the last forward (layers where VAR
        could change rows); ``selected_counts``: ``{layer: (B, heads)}`` rows redistributed over all forwards;
        ``resolved``: ``{"tau", "sink_dims", "layers"}`` used.
    """

    SETTINGS = ("mode", "p", "rho", "tau", "min_image_attention", "sink_dims", "layers")

    def __init__(self, p: Optional[float] = None, rho: float = 0.5, tau: Optional[float] = None,
                 min_image_attention: float = 0.2, sink_dims: Optional[Sequence[int]] = None,
                 layers: Optional[Sequence[int]] = None, mode: str = "official") -> None:
        self.mode = check_choice("VAR", "mode", mode, MODES)
        self.p = DEFAULT_P[self.mode] if p is None else check_number("VAR", "p", p, 0.0, 1.0)
        self.rho = check_number("VAR", "rho", rho, 0.0, 1.0)
        self.tau = None if tau is None else check_number("VAR", "tau", tau, 0.0, None, low_open=True)
        self.min_image_attention = check_number("VAR", "min_image_attention", min_image_attention, 0.0, 1.0)
        self.sink_dims = (None if sink_dims is None else
                          sorted(set(check_index_list("VAR", "sink_dims", sink_dims, allow_negative=False))))
        self.layer_spec = None if layers is None else check_index_list("VAR", "layers", layers)
        self._calibrated: "weakref.WeakKeyDictionary[nn.Module, dict[float, list[int]]]" = weakref.WeakKeyDictionary()
        self.sinks: dict[int, torch.Tensor] = {}
        self.selected_heads: dict[int, torch.Tensor] = {}
        self.selected_counts: dict[int, torch.Tensor] = {}
        self.resolved: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"VAR(p={self.p}, rho={self.rho}, tau={self.tau}, min_image_attention={self.min_image_attention}, "
                f"sink_dims={self.sink_dims}, layers={self.layer_spec}, mode={self.mode!r})")

    def settings(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (``VAR.from_settings(v.settings())`` rebuilds it)."""
        return {"mode": self.mode, "p": self.p, "rho": self.rho, "tau": self.tau,
                "min_image_attention": self.min_image_attention, "sink_dims": self.sink_dims,
                "layers": self.layer_spec}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "VAR":
        """Rebuild from :meth:`settings` (unknown keys raise :class:`ConfigError`)."""
        return cls(**check_settings("VAR", settings, cls.SETTINGS))

    def tau_for(self, model: "TaskMLLM") -> float:
        """The sink threshold for ``model``: given (checked against its hidden size) or :func:`default_tau`."""
        if self.tau is None:
            return default_tau(model.hidden_size)
        check_tau(self.tau, model.hidden_size)
        return self.tau

    def dims_for(self, model: "TaskMLLM") -> list[int]:
        """The sink dimensions for ``model``: given (checked), or calibrated once per model and tau."""
        if self.sink_dims is not None:
            bad = [d for d in self.sink_dims if d >= model.hidden_size]
            if bad:
                raise ConfigError(f"VAR sink_dims {bad} are out of range for hidden size {model.hidden_size}")
            return self.sink_dims
        tau = self.tau_for(model)
        cache = self._calibrated.setdefault(model, {})
        if tau not in cache:
            cache[tau] = calibrate_sink_dims(model, tau=tau)
        return cache[tau]

    def layers_for(self, num_layers: int) -> list[int]:
        """The layers VAR changes in an ``num_layers``-layer LM (paper mode never the last)."""
        if self.layer_spec is None:
            spec = list(range(2, num_layers)) if self.mode == "official" else list(range(num_layers - 1))
        else:
            spec = self.layer_spec
        layers = resolve_layers(spec, num_layers)
        return [i for i in layers if i != num_layers - 1] if self.mode == "paper" else layers

    def attach(self, model: "TaskMLLM", context: Union[GenerationContext, Batch]) -> "VARSession":
        """A context manager applying VAR to ``model``'s LM for the prompt of ``context``."""
        ctx = as_context(model, context)
        return VARSession(self, model, ctx, self.tau_for(model), self.dims_for(model))


class _VARState:
    """Per-attach state read by the attention function: per layer, the keys' :func:`key_basis` (built in the
    prefill, extended in place while decoding), the selections; the image mask of the prompt."""

    def __init__(self, var: VAR, ctx: GenerationContext, layer_of: dict[int, int]) -> None:
        self.var = var
        self.official = var.mode == "official"
        self.image_mask = ctx.image_mask.bool()  # (B, L) prompt
        self.prompt_mask = ctx.attention_mask.bool()  # (B, L)
        length = self.image_mask.shape[1]
        cols = torch.arange(length, device=self.image_mask.device)
        self.last_image = torch.where(self.image_mask, cols, -1).amax(-1)  # (B,) -1 without an image
        self.after_image = int(self.last_image.max()) + 1 if length else 0  # rows from here on are all after it
        self.image_eps = OFFICIAL_EPS * self.image_mask.sum(-1).float()[:, None, None]  # (B, 1, 1), official rule
        self.layer_of = layer_of  # id(attention module) -> layer index
        self.chunk_sinks: dict[int, torch.Tensor] = {}  # paper: layer -> (B, C) flags of the current forward
        self.visual_gate: dict[int, torch.Tensor] = {}  # official: layer -> (B, 1, 1) sample has a visual sink
        self.basis: dict[int, torch.Tensor] = {}  # layer -> (B, capacity, 4) key basis, zero past the keys
        self.keys: dict[int, int] = {}  # layer -> key positions in the last forward
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> (B, K) flags (official: the prefill's, prompt only)
        self.history: dict[int, list[torch.Tensor]] = {}  # layer -> selected rows of every forward

    def record_prompt_sinks(self, layer: int, flags: torch.Tensor) -> None:
        """Official mode: the prefill's ``(B, L)`` sink flags of ``layer`` (prompt tokens only)."""
        flags = flags & self.prompt_mask
        gate = (flags & self.image_mask).any(-1)
        if bool(gate.any()):
            self.visual_gate[layer] = gate[:, None, None]
            self.basis[layer] = key_basis(flags, self.image_mask)
        self.sinks[layer] = flags

    def may_change(self, module: nn.Module) -> bool:
        """Whether VAR may change a row of ``module`` in this forward (official: a visual sink in the batch)."""
        return not self.official or self.layer_of[id(module)] in self.visual_gate

    def _basis(self, layer: int, past: int, keys: int) -> torch.Tensor:
        """``(B, keys, 4)`` basis of ``layer``'s keys; paper mode first writes this forward's sink flags."""
        basis = self.basis.get(layer)
        if basis is not None and basis.shape[1] < keys:  # grown by doubling with zeros (non-image, non-sink)
            basis = torch.cat([basis, basis.new_zeros(basis.shape[0], max(keys, 2 * basis.shape[1]) - basis.shape[1],
                                                      4)], 1)
            self.basis[layer] = basis
        if not self.official:
            chunk = self.chunk_sinks.pop(layer)  # (B, keys - past)
            prompt = self.image_mask.shape[1]
            if basis is None or past < prompt:  # the prefill (or a chunk reaching into the prompt): rebuilt
                image = torch.zeros(chunk.shape[0], keys, dtype=torch.bool, device=chunk.device)
                image[:, :min(keys, prompt)] = self.image_mask[:, :keys]
                old = basis[:, :past, 2].bool() if basis is not None else chunk[:, :0]
                basis = key_basis(torch.cat([old, chunk], 1), image)
                self.basis[layer] = basis
            else:  # generated keys are never image: only the sink column changes
                basis[:, past:keys, 2] = chunk
        self.keys[layer] = keys
        return basis[:, :keys]

    def apply(self, module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        """``(B, heads, Q, K)`` post-softmax weights of ``module`` -> the redistributed weights."""
        layer = self.layer_of[id(module)]
        q, k = weights.shape[-2], weights.shape[-1]
        basis = self._basis(layer, k - q, k)
        rows = None
        if self.official and k - q < self.after_image:  # some row at or before a sample's last image token
            cols = torch.arange(k - q, k, device=weights.device)
            rows = cols[None, :] > self.last_image.to(weights.device)[:, None]  # (B, Q) after the image
        var = self.var
        new, selected = redistribute_on_basis(weights, basis, var.p, var.rho, var.min_image_attention,
                                      self.visual_gate.get(layer), self.image_eps if self.official else None, rows)
        self.history.setdefault(layer, []).append(selected)
        return new

    def all_sinks(self) -> dict[int, torch.Tensor]:
        """``{layer: (B, K) bool}`` sink flags of every key of the last forward."""
        flags = dict(self.sinks)
        flags.update({layer: self.basis[layer][:, :k, 2].bool() for layer, k in self.keys.items()})
        return flags

    def counts(self) -> dict[int, torch.Tensor]:
        """``{layer: (B, heads)}`` rows redistributed over every forward."""
        return {layer: torch.cat(seen, -1).sum(-1) for layer, seen in self.history.items()}  # rows along Q


class VARSession(contextlib.AbstractContextManager):
    """One VAR attach: attention implementation switched, sink hooks installed; all undone on exit."""

    def __init__(self, var: VAR, model: "TaskMLLM", ctx: GenerationContext, tau: float, dims: list[int]) -> None:
        self.var = var
        self.model = model
        self.tau = tau
        self.dims = dims
        layers = decoder_layers(model.llm)
        self.layers = var.layers_for(len(layers))
        self.decoder_layers = layers
        self.attn = {i: attention_module(layers[i]) for i in self.layers}
        self.state = _VARState(var, ctx, {id(m): i for i, m in self.attn.items()})
        self.hooks = HookSet()
        self._sink_handles: dict[int, RemovableHandle] = {}  # official mode removes each after the prefill
        self._previous: Optional[str] = None

    def __enter__(self) -> "VARSession":
        try:
            for i in self.layers:
                self._sink_handles[i] = self.hooks.forward_pre(self.decoder_layers[i], self._sink_hook(i),
                                                               with_kwargs=True)
            if self.var.p > 0 and self.layers:
                previous = self.model.llm.config._attn_implementation
                name = _register(previous)
                self._previous = previous
                self.model.llm.set_attn_implementation(name)
                for module in self.attn.values():
                    setattr(module, STATE_ATTR, self.state)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self.var.sinks = self.state.all_sinks()
        self.var.selected_heads = {layer: seen[-1] for layer, seen in self.state.history.items()}
        self.var.selected_counts = self.state.counts()
        self.var.resolved = {"tau": self.tau, "sink_dims": list(self.dims), "layers": list(self.layers)}
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
        tau, state, official = self.tau, self.state, self.var.mode == "official"
        # one dimension as a list (one `select`), several as an index tensor built once
        dims = self.dims if len(self.dims) == 1 else torch.as_tensor(self.dims, dtype=torch.long,
                                                                     device=self.model.device)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, C, H) entering the layer
            if official:  # the prefill: later forwards reuse its sinks, so the hook removes itself
                length = state.prompt_mask.shape[1]
                if hidden.shape[1] < length:
                    raise InputError(f"VAR was attached for a prompt of length {length} but the first forward "
                                     f"has {hidden.shape[1]} positions")
                state.record_prompt_sinks(layer, sink_flags_official(hidden[:, :length], dims, tau))
                self._sink_handles[layer].remove()
                return None
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
