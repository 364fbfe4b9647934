"""ZeroTuning (arXiv 2505.11739): head-specific scaling of the attention paid to the initial token.

For a chosen head with scale ``gamma``, the post-softmax attention of every query row becomes

    a_0' = gamma * a_0 / D,    a_i' = a_i / D,    D = (gamma - 1) * a_0 + 1 ,

where token 0 is the sample's **first real token** (on a left-padded batch column 0 is often padding; the column
is found per sample from the prompt's attention mask). That is exactly ``log(gamma)`` added to the initial token's
attention logit, so it is applied before the softmax, as an additive bias on the attention mask that the layer's
attention function receives: a forward pre-hook on each chosen layer's attention module turns the mask transformers
built (boolean, additive or None = causal) into an additive ``(B, heads, Q, K)`` mask plus ``log(gamma_h)`` at
(head ``h``, column ``k0[b]``). Any backend that accepts an additive mask works: eager, SDPA, VAR's attention
function (ZeroTuning and VAR compose); flash/flex attention raise :class:`ConfigError`. ``gamma > 1`` raises the
initial token's share and flattens the rest of the row, ``gamma < 1`` lowers it and sharpens the rest.

Heads with ``gamma == 1`` are not touched (``log 1 = 0``) and a layer without a chosen head gets no hook, so the
identity settings are exact on every backend. The hooks live for the ``with`` block only (removed on exit, also
after an exception); no global state.

Which heads and which gamma: :mod:`taskmllm.model.interventions.zerotuning_calibration` profiles heads (scaling
each up and down) and calibrates gamma, supervised (validation accuracy) or unsupervised (output entropy).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.attention import ATTN_NAME as SDPA_FLOAT32_DECODE
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import HookSet, as_context, attention_module, decoder_layers, head_layout
from taskmllm.model.interventions.validation import check_index_list, check_number, check_settings
from taskmllm.model.interventions.masks import additive_mask, first_real_positions
from taskmllm.model.interventions.var import ATTN_NAME, ATTN_NAME_SDPA
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

Head = tuple[int, int]
#: the largest scale accepted (a logit bias of log(1e4) = 9.2 already gives the initial token nearly all attention)
MAX_GAMMA = 1e4
#: attention implementations that receive the (additive) mask the hook rewrites
MASK_BACKENDS = ("eager", "sdpa", SDPA_FLOAT32_DECODE, ATTN_NAME, ATTN_NAME_SDPA)


def _check_pair(value: Any, what: str) -> Head:
    pair = check_index_list("ZeroTuning", what, value)
    if len(pair) != 2:
        raise ConfigError(f"ZeroTuning {what} must be a (layer, head) pair, got {value!r}")
    if pair[1] < 0:
        raise ConfigError(f"ZeroTuning head index must be >= 0, got {pair[1]} in {value!r}")
    return pair[0], pair[1]


def _gamma_items(gammas: Any) -> list[tuple[Any, Any]]:
    """``{(layer, head): gamma}`` or ``[[layer, head, gamma], ...]`` as ``[((layer, head), gamma), ...]``."""
    if isinstance(gammas, Mapping):
        return list(gammas.items())
    if isinstance(gammas, (str, bytes)) or not isinstance(gammas, Sequence):
        raise ConfigError(f"ZeroTuning gammas must be a mapping or a list of [layer, head, gamma], got {gammas!r}")
    items = []
    for entry in gammas:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 3:
            raise ConfigError(f"ZeroTuning gammas entries must be [layer, head, gamma], got {entry!r}")
        items.append(((entry[0], entry[1]), entry[2]))
    return items


class ZeroTuning:
    """Scale the attention to each sample's first real token in chosen heads: ``intervention=`` or ``attach``.

    Args:
        gamma: the scale of every chosen head (1 = identity; in ``(0, 1e4]``).
        heads: the chosen ``(layer, head)`` pairs (negative layer indices allowed); None = every head of every
            layer.
        gammas: per-head scales ``{(layer, head): gamma}`` (or ``[[layer, head, gamma], ...]``); replaces
            ``gamma``/``heads`` when given (per-layer, per-head gamma).

    Raises:
        ConfigError: a gamma that is not a finite number > 0, a malformed head, or ``gammas`` with ``heads``.
    """

    SETTINGS = ("gamma", "heads", "gammas")

    def __init__(self, gamma: float = 1.0, heads: Optional[Sequence[Sequence[int]]] = None,
                 gammas: Optional[Union[Mapping[Head, float], Sequence[Sequence[float]]]] = None) -> None:
        self.gamma = check_number("ZeroTuning", "gamma", gamma, 0.0, MAX_GAMMA, low_open=True)
        if heads is not None and (isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence)):
            raise ConfigError(f"ZeroTuning heads must be a list of (layer, head) pairs, got {heads!r}")
        self.heads: Optional[list[Head]] = None if heads is None else sorted({_check_pair(h, "heads")
                                                                              for h in heads})
        self.gammas: Optional[dict[Head, float]] = None
        if gammas is not None:
            if heads is not None:
                raise ConfigError("ZeroTuning takes either heads (with one gamma) or gammas (per head), not both")
            self.gammas = {}
            for key, value in _gamma_items(gammas):
                pair = _check_pair(key, "gammas key")
                self.gammas[pair] = check_number("ZeroTuning", f"gamma of head {pair}", value, 0.0, MAX_GAMMA,
                                                 low_open=True)

    def __repr__(self) -> str:
        if self.gammas is not None:
            return f"ZeroTuning(gammas={ {k: v for k, v in sorted(self.gammas.items())} })"
        return f"ZeroTuning(gamma={self.gamma}, heads={self.heads})"

    def settings(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (``ZeroTuning.from_settings(z.settings())`` rebuilds it)."""
        return {"gamma": self.gamma, "heads": None if self.heads is None else [list(h) for h in self.heads],
                "gammas": None if self.gammas is None else [[l, h, g] for (l, h), g in sorted(self.gammas.items())]}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ZeroTuning":
        """Rebuild from :meth:`settings` (unknown keys raise :class:`ConfigError`)."""
        return cls(**check_settings("ZeroTuning", settings, cls.SETTINGS))

    def head_gammas(self, num_layers: int, num_heads: int) -> dict[int, torch.Tensor]:
        """``{layer: (num_heads,) float64 gamma}`` for layers with a head whose gamma is not 1.

        Raises:
            ConfigError: a layer or head index out of range for the model.
        """
        if self.gammas is not None:
            chosen = dict(self.gammas)
        else:
            pairs = self.heads if self.heads is not None else [(l, h) for l in range(num_layers)
                                                               for h in range(num_heads)]
            chosen = {pair: self.gamma for pair in pairs}
        out: dict[int, torch.Tensor] = {}
        for (layer, head), gamma in chosen.items():
            idx = layer + num_layers if layer < 0 else layer
            if not 0 <= idx < num_layers or not 0 <= head < num_heads:
                raise ConfigError(f"ZeroTuning head ({layer}, {head}) is out of range for a model with "
                                  f"{num_layers} layers of {num_heads} heads")
            if gamma == 1.0:
                continue
            out.setdefault(idx, torch.ones(num_heads, dtype=torch.float64))[head] = gamma
        return dict(sorted(out.items()))

    def attach(self, model: "TaskMLLM", context: Union[GenerationContext, Batch]) -> "ZeroTuningSession":
        """A context manager applying ZeroTuning to ``model``'s LM for the prompt of ``context``."""
        heads, _ = head_layout(model.llm)
        gammas = self.head_gammas(len(decoder_layers(model.llm)), heads)
        return ZeroTuningSession({layer: torch.log(g) for layer, g in gammas.items()}, model,
                                 as_context(model, context))


class InitialTokenBias:
    """ZeroTuning in log space, differentiable: ``log_gammas`` ``(num_layers, num_heads)`` (a tensor that may
    require grad) is added to the initial token's attention logit of every head — the bias
    ``ZeroTuning(gammas=exp(log_gammas))`` adds. Every layer is hooked, so ``d score / d log_gammas`` at zero is the
    first-order effect of scaling each head (:func:`~taskmllm.model.interventions.zerotuning_calibration.
    gradient_profile`).

    Raises:
        ConfigError: ``log_gammas`` is not 2-d, or (at attach) not the model's ``(num_layers, num_heads)``.
    """

    def __init__(self, log_gammas: torch.Tensor) -> None:
        if log_gammas.dim() != 2:
            raise ConfigError(f"log_gammas must be (num_layers, num_heads), got shape {tuple(log_gammas.shape)}")
        self.log_gammas = log_gammas

    def attach(self, model: "TaskMLLM", context: Union[GenerationContext, Batch]) -> "ZeroTuningSession":
        """A context manager adding the bias to ``model``'s LM for the prompt of ``context``."""
        heads, _ = head_layout(model.llm)
        if tuple(self.log_gammas.shape) != (len(decoder_layers(model.llm)), heads):
            raise ConfigError(f"log_gammas has shape {tuple(self.log_gammas.shape)}; this model has "
                              f"{len(decoder_layers(model.llm))} layers of {heads} heads")
        return ZeroTuningSession(dict(enumerate(self.log_gammas)), model, as_context(model, context))


class ZeroTuningSession(contextlib.AbstractContextManager):
    """One ZeroTuning attach: mask-rewriting pre-hooks on the chosen layers' attention modules.

    Args:
        log_gammas: ``{layer: (num_heads,) log gamma}`` (0 = head untouched); a layer not in it gets no hook.
    """

    def __init__(self, log_gammas: dict[int, torch.Tensor], model: "TaskMLLM", ctx: GenerationContext) -> None:
        layers = decoder_layers(model.llm)
        self.log_gammas = log_gammas
        backend = model.llm.config._attn_implementation
        if self.log_gammas and backend not in MASK_BACKENDS:
            raise ConfigError(f"ZeroTuning adds a bias to the attention mask; the '{backend}' attention does not "
                              f"take an additive mask: use attn_implementation 'sdpa' or 'eager'")
        self.model = model
        self.modules = {i: attention_module(layers[i]) for i in self.log_gammas}
        self.first = first_real_positions(ctx.attention_mask).to(model.device)  # (B,) the initial token
        self.hooks = HookSet()
        self._shared: Optional[tuple] = None  # (mask, key, base, onehot) of the last forward
        self._decode_bias: dict[int, torch.Tensor] = {}  # layer -> (B, heads, 1, capacity) bias of one-row steps

    def _mask_parts(self, mask: Optional[torch.Tensor], q_len: int, k_len: int, hidden: torch.Tensor):
        """The additive base mask ``(B|1, 1, Q, K)`` and the initial-token one-hot ``(B, 1, 1, K)`` of this forward,
        built by its first hooked layer and reused by the others: every layer of a forward gets the same mask
        tensor. Reuse needs that very tensor (held, so its id is not recycled) at the same version (not modified in
        place) and the same lengths and dtype, so a new or changed mask never gets stale parts."""
        key = (None if mask is None else mask._version, q_len, k_len, hidden.dtype, hidden.device)
        if self._shared is None or self._shared[0] is not mask or self._shared[1] != key:
            base = additive_mask(mask, q_len, k_len, hidden.dtype, hidden.device)
            self._shared = (mask, key, base, self._initial_onehot(k_len, hidden))
        return self._shared[2], self._shared[3]

    def _initial_onehot(self, length: int, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1, length)`` in ``hidden``'s dtype: 1 at each sample's initial token, 0 elsewhere."""
        onehot = torch.arange(length, device=hidden.device)[None] == self.first[:, None]  # (B, length)
        return onehot[:, None, None, :].to(hidden.dtype)

    def _one_row_bias(self, layer: int, log_gamma: torch.Tensor, k_len: int, hidden: torch.Tensor) -> torch.Tensor:
        """The ``(B, heads, 1, k_len)`` mask of a one-query step without a mask (a decode step of an unpadded
        batch: the query sees every key, so the mask is the initial-token bias alone), sliced from a per-layer
        tensor built for twice the keys and rebuilt only when the keys outgrow it: no kernel per step but the
        slice."""
        bias = self._decode_bias.get(layer)
        if bias is None or bias.shape[-1] < k_len or bias.dtype != hidden.dtype or bias.device != hidden.device:
            bias = self._initial_onehot(2 * k_len, hidden) * log_gamma.to(hidden.dtype)[None, :, None, None]
            self._decode_bias[layer] = bias
        return bias[..., :k_len]

    def __enter__(self) -> "ZeroTuningSession":
        try:
            for layer, module in self.modules.items():
                self.hooks.forward_pre(module, self._hook(layer), with_kwargs=True)
        except BaseException:
            self.hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()
        self._shared = None
        self._decode_bias = {}
        return None

    def _hook(self, layer: int):
        log_gamma = self.log_gammas[layer].to(self.model.device)  # (heads,) 0 where gamma = 1

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, Q, H)
            mask = kwargs.get("attention_mask")
            q_len = hidden.shape[1]
            if mask is not None:
                k_len = mask.shape[-1]
            else:  # transformers skipped the mask (no padding, causal): the keys are the cache plus this chunk
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                k_len = q_len + (cache.get_seq_length(layer) if cache is not None else 0)
            bsz = hidden.shape[0]
            if self.first.shape[0] != bsz:
                raise InputError(f"ZeroTuning was attached for a batch of {self.first.shape[0]} but a forward "
                                 f"has {bsz}")
            if mask is None and q_len == 1:
                kwargs["attention_mask"] = self._one_row_bias(layer, log_gamma, k_len, hidden)  # (B, h, 1, K)
                return args, kwargs
            base, onehot = self._mask_parts(mask, q_len, k_len, hidden)  # (B|1, 1, Q, K), (B, 1, 1, K)
            kwargs["attention_mask"] = base + onehot * log_gamma.to(hidden.dtype)[None, :, None, None]  # (B, h, Q, K)
            return args, kwargs

        return hook

