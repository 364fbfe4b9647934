"""VHR — Vision-aware Head Reinforcement (arXiv 2412.13949), on any attention backend.

At the first generation step (the prefill), a second forward of the prompt **without its visual tokens** runs
in lockstep with the real prefill, in a worker thread. The two take turns layer by layer, one running while the
other waits (no oversubscribed cores, no thread switch inside a layer): the image pass runs a layer's attention
and hands over at its ``o_proj``; the worker runs that layer (when the prefill fills a KV cache, it reads the keys
and values of the text before the first visual token from it and computes only the text after it:
:mod:`~taskmllm.model.interventions.no_image_pass`), selects the layer's heads if it is configured, and hands
back before its next layer. At every configured layer both passes stop before
``o_proj``, the per-head outputs at the step's query position (each sample's last real prompt token, found from
the attention mask, so left, right or no padding all read the right column) give

    VHD[b, h] = || A_h(image pass)[b] - A_h(no-image pass)[b] ||_2 ,   TA[b, h] = || A_h(no-image pass)[b] ||^2

heads whose VHD **and** TA are both above the layer's mean + std are outliers and get VHD 0; heads with VHD above
the layer's median are selected; both passes then multiply the selected heads' outputs by ``alpha`` before
``o_proj`` and continue — so a layer's VHD is computed after the
earlier layers were reinforced. Each sample has its own heads. The selection is kept for every later forward.

Reinforcement positions: the selected heads are reinforced at **every position** of every forward (prompt
included). With a KV cache this equals reinforcing each step's query position, since every cached position was
a query position once — except the prompt, which the paper's KV-cache reuse also leaves reinforced. Applying
it everywhere makes the cached path equal to recomputation and lets the real prefill *be* the image pass of
the selection (the only extra cost is the text-only no-image pass).

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
import math
import threading
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.decoding import cache_keyword
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.hooks import (HookSet, as_context, decoder_layers, head_layout,
                                                output_projection, resolve_layers)
from taskmllm.model.interventions.masks import last_real_positions
from taskmllm.model.interventions.no_image_pass import (TextPass, copy_prefix, is_full_attention_cache, prefix_cache,
                                                        prefix_reuse_inputs, whole_pass)
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
            range for the model raise at attach.

    After a generation, for inspection (from the most recent attach):
        ``selected_heads``: ``{layer: (B, heads) bool}``; ``vhd``: ``{layer: (B, heads)}`` raw VHD;
        ``outliers``: ``{layer: (B, heads) bool}``; ``layers``: the layers used; ``reused_prefix``: whether the
        no-image pass read the text before the first visual token from the image pass's KV cache
        (:mod:`~taskmllm.model.interventions.no_image_pass`) instead of recomputing it.
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
    """One VHR attach: the lockstep selection at the first forward (the two passes take turns), then the kept
    reinforcement."""

    def __init__(self, vhr: VHR, model: "TaskMLLM", ctx: GenerationContext) -> None:
        self.vhr = vhr
        self.model = model
        self.ctx = ctx
        self.decoder_layers = decoder_layers(model.llm)
        spec = vhr.layer_spec if vhr.layer_spec is not None else default_layers(len(self.decoder_layers))
        self.layers = resolve_layers(spec, len(self.decoder_layers))
        self.modules = {i: output_projection(self.decoder_layers[i]) for i in self.layers}
        self.heads, self.head_dim = head_layout(model.llm)
        self.hooks = HookSet()  # the reinforcement, kept for the whole attach
        self._pass_hooks = HookSet()  # the selection's (start, prefix reuse), removed once every layer is selected
        self.scales: dict[int, torch.Tensor] = {}  # layer -> (B, 1, heads * head_dim)
        self.vhd: dict[int, torch.Tensor] = {}
        self.outliers: dict[int, torch.Tensor] = {}
        self.selected: dict[int, torch.Tensor] = {}
        self.reused_prefix = False  # whether the no-image pass read the prefix from the image pass's cache
        self._deposit: dict[str, torch.Tensor] = {}
        self._worker: Optional[threading.Thread] = None
        self._worker_error: Optional[BaseException] = None
        self._worker_ident: Optional[int] = None
        self._pending = list(self.layers)  # layers whose selection is still to be made
        self._last = last_real_positions(ctx.attention_mask)  # (B,) the query position of the image pass
        self._threads = torch.get_num_threads()  # the caller's intra-op threads, for the worker (see _no_image_pass)
        # the two passes take turns (one runs while the other waits), guarded by one condition:
        self._turn = threading.Condition()
        self._image_at = -1  # the last layer the image pass has handed over (its attention done, keys cached)
        self._worker_at = -1  # the layer the worker waits to start (math.inf once it has ended)
        self._aborted = False
        self._image_cache: Any = None
        self._text_cache: Any = None
        self._text: Optional[TextPass] = None

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "VHRSession":
        try:
            for i in self.layers:
                self.hooks.forward_pre(self.modules[i], self._hook(i))
            if self._pending:
                self._pass_hooks.forward_pre(self.model.llm.get_decoder(), self._start, with_kwargs=True)
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
        with self._turn:
            self._aborted = True  # releases a worker waiting for its turn
            self._turn.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self._pass_hooks.remove()
        self.hooks.remove()

    # ------------------------------------------------------------------------------- no-image pass
    class _Done(Exception):
        """Raised inside the worker's forward once the last configured layer has been selected."""

    def _start(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder pre-hook: at the image pass's first forward, start the no-image pass beside it — on the
        text after the first visual token when the image pass fills an empty full-attention KV cache (the
        prefix's keys and values are read from it, :mod:`no_image_pass`), else on the whole text."""
        if self._worker is not None or threading.get_ident() == self._worker_ident:
            return None
        first = kwargs.get("inputs_embeds", kwargs.get("input_ids", args[0] if args else None))
        bsz, length = self.ctx.attention_mask.shape  # the prompt, which the forward may continue (teacher forcing)
        if first is not None and (first.shape[0] != bsz or first.shape[1] < length):
            raise InputError(f"VHR was attached for a prompt of shape {tuple(self.ctx.attention_mask.shape)} but "
                             f"the first forward has {tuple(first.shape[:2])}")
        cache = kwargs.get(cache_keyword(type(decoder)))
        needed = self.layers[-1] + 1  # the pass stops at the last selected layer
        text = prefix_reuse_inputs(self.ctx) if is_full_attention_cache(cache, needed) else None
        if text is not None:
            kv_heads = int(getattr(self.model.llm.config, "num_key_value_heads", None) or self.heads)
            self._image_cache, self.reused_prefix = cache, True  # keys and values come in the activations' dtype
            self._text_cache = prefix_cache(text, needed, kv_heads, self.head_dim, self.ctx.inputs_embeds.dtype)
        for i in range(needed):  # the worker runs layer i once the image pass has run its attention (o_proj's input)
            self._pass_hooks.forward_pre(self.decoder_layers[i], self._worker_turn(i))
            self._pass_hooks.forward_pre(output_projection(self.decoder_layers[i]), self._image_turn(i),
                                         prepend=True)  # before the reinforcement's hook
        self._text = text or whole_pass(self.ctx)
        self._worker = threading.Thread(target=self._no_image_pass, args=(self._text,), daemon=True,
                                        name="taskmllm-vhr-no-image")
        self._worker.start()
        return None

    def _worker_turn(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:  # decoder layer pre-hook: the worker waits for its turn
            if threading.get_ident() != self._worker_ident:
                return None
            with self._turn:
                self._worker_at = layer
                self._turn.notify_all()
                self._turn.wait_for(lambda: self._image_at >= layer or self._aborted)
                if self._aborted:
                    raise VHRSession._Done()
            if self._text_cache is not None:
                copy_prefix(self._text_cache, self._image_cache, layer, self._text)
            return None

        return hook

    def _image_turn(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:  # o_proj pre-hook: the image pass hands over
            if threading.get_ident() == self._worker_ident:
                return None
            x = args[0]  # (B, T, heads * head_dim): the concatenated head outputs
            if self._pending and layer == self._pending[0]:
                query = x[torch.arange(x.shape[0], device=x.device), self._last.to(x.device)]
                self._deposit["image"] = query.reshape(x.shape[0], self.heads, self.head_dim)
            with self._turn:
                self._image_at = layer
                self._turn.notify_all()
                self._turn.wait_for(lambda: self._worker_at > layer)
            if layer in self.modules and layer not in self.scales:
                raise RuntimeError(f"VHR's no-image pass failed before layer {layer}") from self._worker_error
            if layer == self.layers[-1]:
                self._pass_hooks.remove()  # the worker has ended: later forwards skip the turns
            return None

        return hook

    def _no_image_pass(self, text: TextPass) -> None:
        self._worker_ident = threading.get_ident()
        # OpenMP's thread count is per thread: a new thread would start a pool of every core (whose spin-waiting
        # cost 1.6x the CPU time of a 64-token decode at one thread); run the pass with the caller's count (the
        # value the process already has: nothing changes for other threads)
        torch.set_num_threads(self._threads)
        decoder = self.model.llm.get_decoder()
        cache = {cache_keyword(type(decoder)): self._text_cache} if self._text_cache is not None else {}
        try:
            with torch.no_grad():
                decoder(inputs_embeds=text.inputs_embeds, attention_mask=text.attention_mask,
                        position_ids=text.position_ids, use_cache=bool(cache), **cache)
        except VHRSession._Done:
            pass
        except Exception as exc:  # reported to the image pass, which raises it
            self._worker_error = exc
        finally:
            with self._turn:
                self._worker_at = math.inf
                self._turn.notify_all()

    # ---------------------------------------------------------------------------------------- hooks
    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # (B, T, heads * head_dim): the concatenated head outputs
            if layer not in self.scales:  # the worker's turn at a layer still to select (the image pass waits)
                if threading.get_ident() != self._worker_ident:
                    raise RuntimeError(f"VHR reached layer {layer} before its selection: the prompt's first "
                                       f"forward did not go through the LM's decoder")
                self._deposit["no_image"] = x[:, -1].reshape(x.shape[0], self.heads, self.head_dim)
                self._select(layer)
                if layer == self.layers[-1]:
                    raise VHRSession._Done()
            return (x * self.scales[layer],) + tuple(args[1:])

        return hook

    def _select(self, layer: int) -> None:
        """The selection at ``layer`` from both passes' deposits (in the worker, while the image pass waits)."""
        self._pending.remove(layer)
        img, no = self._deposit["image"].float(), self._deposit["no_image"].float()
        vhd = (img - no).norm(dim=-1)  # (B, heads)
        # a sample without visual tokens has VHD 0 by definition (both passes are the same prompt; only
        # rounding from the different padding differs) -> no head is selected for it
        vhd = vhd * self.ctx.image_mask.any(-1, keepdim=True).to(vhd.device)
        ta = no.pow(2).sum(-1)
        outliers, selected = select_heads(vhd, ta, self.vhr.remove_outliers)
        self.vhd[layer], self.outliers[layer], self.selected[layer] = vhd, outliers, selected
        scale = torch.where(selected, self.vhr.alpha, 1.0).to(self._deposit["image"].dtype)  # (B, heads)
        self.scales[layer] = scale.repeat_interleave(self.head_dim, dim=-1).unsqueeze(1)
