"""VHR — Vision-aware Head Reinforcement (arXiv 2412.13949), with SDPA or eager attention.

At the first generation step (the prefill) the prompt is also run **without its visual tokens**, in the same
forward: the text after the first visual token is appended to the prompt as extra columns, under a 4D mask that
leaves the prompt's own attention as it was and lets the extra columns read only their sample's text before the
first visual token (the prefix, whose keys and values are the same in both passes) and each other
(:mod:`~taskmllm.model.interventions.no_image_pass`). One pass over the weights serves both; the outputs and the
KV cache are cut back to the prompt's columns after it. At every configured layer, before ``o_proj``, the
per-head outputs at the step's query position (the image pass: each sample's last real prompt token, found from
the attention mask, so left, right or no padding all read the right column; the no-image pass: the last column)
give

    VHD[b, h] = || A_h(image pass)[b] - A_h(no-image pass)[b] ||_2 ,   TA[b, h] = || A_h(no-image pass)[b] ||^2

heads whose VHD **and** TA are both above the layer's mean + std are outliers and get VHD 0; heads with VHD above
the layer's median are selected; both passes then multiply the selected heads' outputs by ``alpha`` before
``o_proj`` and continue — so a layer's VHD is computed after the earlier layers were reinforced. Each sample has
its own heads. The selection is kept for every later forward.

Reinforcement positions: the selected heads are reinforced at **every position** of every forward (prompt
included). With a KV cache this equals reinforcing each step's query position, since every cached position was
a query position once — except the prompt, which the paper's KV-cache reuse also leaves reinforced. Applying
it everywhere makes the cached path equal to recomputation and lets the real prefill *be* the image pass of
the selection (the only extra cost is the no-image pass's columns in that forward). At ``alpha = 1`` the
prompt's real columns come out as without VHR (bit for bit in the tests, SDPA and eager; the products have more
rows, which could change the last bits on another BLAS); a padding column, read by nothing, attends to itself.

Outlier rule, decided: the paper states "mean + standard deviation" of the layer's heads without qualifying the
standard deviation. We use the **sample** (Bessel-corrected, ``ddof = 1``) standard deviation: it is what an
unqualified "std" computes in the paper's PyTorch stack (``Tensor.std``), it is the usual estimate of the spread
of a handful of values, and it is the more conservative choice on layers with few heads (with 4 heads the
population rule flags the strongest head more often). On 32 heads the two differ by 1.6 %, so the paper's
numbers do not distinguish them. A layer with fewer than 2 heads has no outliers.

Settings: ``alpha`` and ``layers`` are parameters. The constructor's defaults are the paper's (``alpha = 2``,
layer 1 plus the last ``round(14/32 * N)`` of an ``N``-layer LM — "1 + last 14 of 32" for LLaVA-1.5-7B, scaled
with depth); they are a fallback for a model without a calibration. ``taskmllm.eval.calibrate`` picks both per
model on its validation world and stores them beside the model (``interventions.json``); a model that carries
calibrated settings is run with those (:meth:`VHR.from_settings`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.attention import is_sdpa
from taskmllm.model.decoding import attention_bias, cache_keyword
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import (HookSet, as_context, decoder_layers, head_layout,
                                                output_projection, resolve_layers)
from taskmllm.model.interventions.masks import last_real_positions
from taskmllm.model.interventions.no_image_pass import (full_attention_for, is_empty_cache, keep_prompt_columns,
                                                        packed_allowed, prefix_reuse_inputs, prompt_allowed,
                                                        whole_pass)
from taskmllm.model.interventions.validation import check_index_list, check_number, check_settings
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

LAST_FRACTION = 14 / 32
#: the largest alpha accepted (the paper's alpha = 4 already degenerates the captions)
MAX_ALPHA = 100.0


def default_layers(num_layers: int) -> list[int]:
    """Layer 1 plus the last ``round(14/32 * num_layers)`` layers (``[1] + 18..31`` for 32 layers)."""
    last = max(1, round(LAST_FRACTION * num_layers))
    return sorted({min(1, num_layers - 1)} | set(range(num_layers - last, num_layers)))


def outlier_threshold(values: torch.Tensor) -> torch.Tensor:
    """``(B, heads)`` -> ``(B, 1)`` the layer's ``mean + std`` with the sample (Bessel-corrected) std.

    With fewer than 2 heads the std is undefined: the threshold is ``+inf`` (no outlier).
    """
    if values.shape[-1] < 2:
        return torch.full_like(values[..., :1], float("inf"))
    return values.mean(-1, keepdim=True) + values.std(-1, correction=1, keepdim=True)


def select_heads(vhd: torch.Tensor, ta: torch.Tensor, remove_outliers: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-layer VHR rule.

    Args:
        vhd: ``(B, heads)`` head divergences of one layer.
        ta: ``(B, heads)`` squared norms of the heads' no-image outputs.
        remove_outliers: zero the VHD of heads whose VHD and TA are both above mean + std (sample std, see the
            module docstring).

    Returns:
        ``(outliers (B, heads) bool, selected (B, heads) bool)``: selected = VHD (outliers zeroed) > median.
    """
    vhd, ta = vhd.float(), ta.float()
    outliers = torch.zeros_like(vhd, dtype=torch.bool)
    if remove_outliers:
        outliers = (vhd > outlier_threshold(vhd)) & (ta > outlier_threshold(ta))
    kept = vhd.masked_fill(outliers, 0.0)
    median = kept.quantile(0.5, dim=-1, keepdim=True)
    return outliers, kept > median


class VHR:
    """Vision-aware Head Reinforcement: pass as ``intervention=`` to ``generate``, or ``with vhr.attach(...)``.

    Args:
        alpha: factor on the selected heads' outputs (paper: 2; 1 is the identity; in ``(0, 100]``).
        layers: decoder layers to reinforce (negative indices allowed); None = :func:`default_layers`.
        remove_outliers: apply the outlier rule (VHD and TA both above mean + sample std -> VHD 0).

    Raises:
        ConfigError: a setting of the wrong type or out of range (named with its value); layer indices out of
            range for the model, or an attention implementation other than SDPA or eager, raise at attach.

    After a generation, for inspection (from the most recent attach):
        ``selected_heads``: ``{layer: (B, heads) bool}``; ``vhd``: ``{layer: (B, heads)}`` raw VHD;
        ``outliers``: ``{layer: (B, heads) bool}``; ``layers``: the layers used; ``reused_prefix``: whether the
        no-image pass read the text before the first visual token from the image pass's columns
        (:mod:`~taskmllm.model.interventions.no_image_pass`) instead of recomputing it (false when no sample
        has text before its first visual token).
    """

    SETTINGS = ("alpha", "layers", "remove_outliers")

    def __init__(self, alpha: float = 2.0, layers: Optional[Sequence[int]] = None,
                 remove_outliers: bool = True) -> None:
        self.alpha = check_number("VHR", "alpha", alpha, 0.0, MAX_ALPHA, low_open=True)
        self.layer_spec = None if layers is None else check_index_list("VHR", "layers", layers)
        if not isinstance(remove_outliers, bool):
            raise ConfigError(f"VHR remove_outliers must be True or False, got {remove_outliers!r}")
        self.remove_outliers = remove_outliers
        self.selected_heads: dict[int, torch.Tensor] = {}
        self.vhd: dict[int, torch.Tensor] = {}
        self.outliers: dict[int, torch.Tensor] = {}
        self.layers: list[int] = []
        self.reused_prefix = False

    def __repr__(self) -> str:
        return f"VHR(alpha={self.alpha}, layers={self.layer_spec}, remove_outliers={self.remove_outliers})"

    def settings(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (``VHR.from_settings(v.settings())`` rebuilds it)."""
        return {"alpha": self.alpha, "layers": self.layer_spec, "remove_outliers": self.remove_outliers}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "VHR":
        """Rebuild from :meth:`settings` (unknown keys raise :class:`ConfigError`)."""
        return cls(**check_settings("VHR", settings, cls.SETTINGS))

    def attach(self, model: "TaskMLLM", context: Union[GenerationContext, Batch]) -> "VHRSession":
        """A context manager applying VHR to ``model``'s LM; its first forward must be the prompt's prefill."""
        return VHRSession(self, model, as_context(model, context))


class VHRSession(contextlib.AbstractContextManager):
    """One VHR attach: the selection inside the prompt's first forward (the no-image tokens packed beside the
    prompt, :mod:`~taskmllm.model.interventions.no_image_pass`), then the kept reinforcement."""

    def __init__(self, vhr: VHR, model: "TaskMLLM", ctx: GenerationContext) -> None:
        backend = model.llm.config._attn_implementation
        if not (is_sdpa(backend) or backend == "eager"):
            raise ConfigError(f"VHR runs its no-image pass in the prompt's forward under a 4D mask; the '{backend}' "
                              f"attention does not take one: use attn_implementation 'sdpa' or 'eager'")
        self.vhr = vhr
        self.model = model
        self.ctx = ctx
        self.decoder_layers = decoder_layers(model.llm)
        spec = vhr.layer_spec if vhr.layer_spec is not None else default_layers(len(self.decoder_layers))
        self.layers = resolve_layers(spec, len(self.decoder_layers))
        self.modules = {i: output_projection(self.decoder_layers[i]) for i in self.layers}
        self.heads, self.head_dim = head_layout(model.llm)
        self.hooks = HookSet()  # the reinforcement, kept for the whole attach
        self._pass_hooks = HookSet()  # the packing of the first forward, removed once it has run
        self.scales: dict[int, torch.Tensor] = {}  # layer -> (B, 1, heads * head_dim)
        self.vhd: dict[int, torch.Tensor] = {}
        self.outliers: dict[int, torch.Tensor] = {}
        self.selected: dict[int, torch.Tensor] = {}
        self.reused_prefix = False  # whether the no-image tokens read the prompt's prefix instead of computing it
        self._pending = list(self.layers)  # layers whose selection is still to be made
        self._last = last_real_positions(ctx.attention_mask)  # (B,) the image pass's query position
        self._prompt_columns: Optional[int] = None  # T, while the packed first forward runs
        self._target_cache: Any = None  # the cache the caller gave the first forward

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "VHRSession":
        try:
            for i in self.layers:
                self.hooks.forward_pre(self.modules[i], self._hook(i))
            if self._pending:
                decoder = self.model.llm.get_decoder()
                self._pass_hooks.forward_pre(decoder, self._pack, with_kwargs=True)
                self._pass_hooks.forward(decoder, self._unpack)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self.vhr.layers = list(self.layers)
        self.vhr.selected_heads = dict(self.selected)
        self.vhr.vhd = dict(self.vhd)
        self.vhr.outliers = dict(self.outliers)
        self.vhr.reused_prefix = self.reused_prefix
        return None

    def _close(self) -> None:
        self._pass_hooks.remove()
        self.hooks.remove()

    # ------------------------------------------------------------------------- the packed first forward
    def _pack(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Decoder pre-hook at the prompt's first forward: append the no-image pass's tokens (the text after the
        first visual token, reading the prompt's prefix; the whole text when there is no prefix) as extra columns,
        under a 4D mask that keeps the prompt's own attention as it was; a private ``DynamicCache`` takes the
        forward's keys and values in place of the caller's (:meth:`_unpack` hands it the prompt's columns)."""
        emb = kwargs.get("inputs_embeds")
        bsz, length = self.ctx.attention_mask.shape  # the prompt, which the forward may continue (teacher forcing)
        if args or emb is None:
            raise InputError("VHR needs the LM's decoder called with keyword arguments and inputs_embeds")
        if emb.shape[0] != bsz or emb.shape[1] < length:
            raise InputError(f"VHR was attached for a prompt of shape {tuple(self.ctx.attention_mask.shape)} but "
                             f"the first forward has {tuple(emb.shape[:2])}")
        key = cache_keyword(type(decoder))
        cache = kwargs.get(key)
        if cache is not None and not is_empty_cache(cache):
            raise InputError(f"VHR's first forward must start the prompt, but its cache holds "
                             f"{cache.get_seq_length()} columns")
        text = prefix_reuse_inputs(self.ctx) or whole_pass(self.ctx)
        columns = emb.shape[1]
        if not full_attention_for(self.model.llm.config, columns + text.text_mask.shape[1]):
            raise ConfigError(f"VHR packs its no-image pass into the prompt's forward, which needs every layer to "
                              f"see the whole prompt; {type(self.model.llm).__name__} has a shorter sliding window")
        pos = kwargs.get("position_ids")
        if pos is None:  # transformers' default: the columns' indices
            pos = torch.arange(columns, device=emb.device).expand(bsz, -1)
        allowed = packed_allowed(prompt_allowed(kwargs.get("attention_mask"), bsz, columns, emb.device), text)
        packed = dict(kwargs, inputs_embeds=torch.cat([emb, text.inputs_embeds.to(emb.dtype)], 1),
                      position_ids=torch.cat([pos, text.position_ids.to(pos.device)], 1),
                      attention_mask=attention_bias(allowed, self.model.llm, emb.dtype))
        packed.pop("cache_position", None)  # transformers numbers the packed columns from the empty cache
        if cache is not None:
            from transformers import DynamicCache

            packed[key] = DynamicCache()
        self._prompt_columns, self._target_cache = columns, cache
        self.reused_prefix = text.reuses_prefix
        return (), packed

    def _unpack(self, decoder: nn.Module, args: tuple, output: Any) -> Any:
        """Decoder forward hook after the packed forward: every output back to the prompt's columns (hidden states,
        attentions, the cache: the caller's gets the prompt's keys and values); later forwards run as they come."""
        columns, self._prompt_columns = self._prompt_columns, None
        self._pass_hooks.remove()
        output.last_hidden_state = output.last_hidden_state[:, :columns]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, :columns] for h in output.hidden_states)
        if getattr(output, "attentions", None) is not None:
            output.attentions = tuple(a[..., :columns, :columns] for a in output.attentions)
        packed = getattr(output, "past_key_values", None)
        if packed is not None:  # into the caller's cache, or a new one when transformers made the packed one
            if self._target_cache is None:
                from transformers import DynamicCache

                self._target_cache = DynamicCache()
            keep_prompt_columns(packed, self._target_cache, columns)
            output.past_key_values = self._target_cache
        self._target_cache = None
        return output

    # ---------------------------------------------------------------------------------------- hooks
    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # (B, T, heads * head_dim): the concatenated head outputs
            if layer not in self.scales:  # the packed first forward: (B, T + S, ...), the selection is made here
                if self._prompt_columns is None:
                    raise RuntimeError(f"VHR reached layer {layer} before its selection: the prompt's first "
                                       f"forward did not go through the LM's decoder")
                self._select(layer, x)
            return (x * self.scales[layer],) + tuple(args[1:])

        return hook

    def _select(self, layer: int, x: torch.Tensor) -> None:
        """The selection at ``layer`` from the packed forward's head outputs ``x`` ``(B, T + S, heads * head_dim)``:
        the image pass's at each sample's last real prompt token, the no-image pass's at the last column."""
        self._pending.remove(layer)
        bsz = x.shape[0]
        img = x[torch.arange(bsz, device=x.device), self._last.to(x.device)].reshape(bsz, self.heads, self.head_dim)
        no = x[:, -1].reshape(bsz, self.heads, self.head_dim).float()
        vhd = (img.float() - no).norm(dim=-1)  # (B, heads)
        # a sample without visual tokens has VHD 0 by definition (both passes are the same prompt; only
        # rounding from the different padding differs) -> no head is selected for it
        vhd = vhd * self.ctx.image_mask.any(-1, keepdim=True).to(vhd.device)
        ta = no.pow(2).sum(-1)
        outliers, selected = select_heads(vhd, ta, self.vhr.remove_outliers)
        self.vhd[layer], self.outliers[layer], self.selected[layer] = vhd, outliers, selected
        scale = torch.where(selected, self.vhr.alpha, 1.0).to(x.dtype)  # (B, heads)
        self.scales[layer] = scale.repeat_interleave(self.head_dim, dim=-1).unsqueeze(1)
