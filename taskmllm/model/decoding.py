"""How ``generate`` feeds chunks to the language model: the cache it keeps and the step it runs.

- :class:`DynamicDecoder` — transformers' ``DynamicCache`` (or, without a cache, recomputation of the whole
  sequence), the 2D mask of everything fed kept in one buffer allocated per call and sliced per step. The default:
  on a 2-core CPU eager attention over exactly the fed keys is cheaper than over a preallocated length.
- :class:`StaticDecoder` — ``compile=True``: transformers' ``StaticCache`` preallocated once per call, a boolean
  ``(B, L_max)`` "may attend" buffer updated in place, our own 4D masks (no mask building inside transformers),
  and the one-token decode step compiled with ``torch.compile`` (inductor on CPU, with batch-1 weight products as
  streaming reductions, :mod:`taskmllm.model.matvec`; CUDA graphs through ``mode="reduce-overhead"`` on GPU). The
  compiled step is kept per model (:class:`CompiledSteps`), so its warm-up is paid once per batch size, not per
  call; cache lengths are rounded up to :data:`CACHE_BUCKET`, and a second length of a batch size compiles a step
  whose cache length is dynamic (:meth:`CompiledSteps.mark_length`), which serves every later length.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from taskmllm.errors import ConfigError
from taskmllm.model.attention import is_sdpa
from taskmllm.model.linear_backend import onednn_linears
from taskmllm.model.matvec import compile_options

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

#: static cache lengths are multiples of this, so that calls of similar lengths reuse one compiled graph; a decode
#: step's attention reads every column: 32 rather than 128 made ``bench/generate.py``'s compiled batch-8 call ~12%
#: faster on the CPU (its KV cache and the weights then fit the L3 cache together)
CACHE_BUCKET = 32


def _plain_head(llm: torch.nn.Module) -> bool:
    """logits = lm_head(hidden) unless the LM scales or soft-caps them (then the whole LM runs)."""
    cfg = llm.config
    return getattr(cfg, "final_logit_softcapping", None) is None and not hasattr(cfg, "logit_scale")


def run_llm(llm: torch.nn.Module, plain_head: bool, keep: int, last_only: bool, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One LM forward -> logits ``(B, keep or 1, V)`` and last hidden states ``(B, keep, H)`` of the last ``keep``
    positions (the chunk just fed).

    ``kwargs`` go to the decoder (``inputs_embeds``, ``attention_mask``, ``position_ids``, ``cache``,
    ``use_cache``); ``cache`` is passed under the name the installed transformers reads (:func:`cache_keyword`);
    ``last_only`` keeps the logits of the last position only (transformers' ``logits_to_keep=1``).
    """
    decoder = llm.get_decoder()
    if "cache" in kwargs:
        kwargs[cache_keyword(type(decoder))] = kwargs.pop("cache")
    emb = kwargs["inputs_embeds"]
    # a prefill's products; one-token steps run as they are
    with onednn_linears(emb.shape[0] * emb.shape[1], emb.device):
        if plain_head:  # decoder + lm_head on the chunk: no hidden-state capture of every layer
            hidden = decoder(**kwargs).last_hidden_state[:, -keep:]  # after the final norm
            return llm.get_output_embeddings()(hidden[:, -1:] if last_only else hidden), hidden
        out = llm(**kwargs, output_hidden_states=True)
    logits = out.logits[:, -keep:]
    return (logits[:, -1:] if last_only else logits), out.hidden_states[-1][:, -keep:]


@functools.lru_cache(maxsize=None)
def cache_keyword(decoder_type: type) -> str:
    """The name under which ``decoder_type.forward`` takes its KV cache: ``cache`` from transformers 5.24 (which
    warns on ``past_key_values`` and drops it in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


class DynamicDecoder:
    """Feeds chunks with transformers' ``DynamicCache``, or by recomputing the whole sequence (``use_cache=False``).

    Args:
        model: the TaskMLLM.
        use_cache: False recomputes everything at every step (the reference for the cached path).
        batch_size, capacity: rows and the positions one call is expected to feed; the mask of everything fed
            lives in one ``(B, capacity)`` buffer (doubled when a call feeds more).
    """

    def __init__(self, model: "TaskMLLM", use_cache: bool, batch_size: int, capacity: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.llm.config) if use_cache else None
        device = model.device
        self.buffer = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.length = 0
        self.emb: Optional[torch.Tensor] = None  # (B, T, H), only without cache
        self.pos: Optional[torch.Tensor] = None
        self.plain_head = _plain_head(model.llm)
        self.sdpa = is_sdpa(model.llm.config._attn_implementation)
        self.padded = False  # any masked position fed so far

    def feed(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
             last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``(B, C, H)`` embeddings with their ``(B, C)`` mask and positions; returns logits ``(B, C, V)``
        (``(B, 1, V)`` with ``last_only``: the left-padded prefill, whose rows all end in the last column) and the
        last hidden states ``(B, C, H)`` of the chunk."""
        c = mask.shape[1]
        if self.length + c > self.buffer.shape[1]:
            grown = self.buffer.new_zeros(self.buffer.shape[0], 2 * (self.length + c))
            grown[:, : self.length] = self.buffer[:, : self.length]
            self.buffer = grown
        self.buffer[:, self.length: self.length + c] = mask
        self.length += c
        self.padded = self.padded or not bool(mask.all())
        if self.cache is None:
            self.emb = emb if self.emb is None else torch.cat([self.emb, emb], 1)
            self.pos = pos if self.pos is None else torch.cat([self.pos, pos], 1)
            emb, pos = self.emb, self.pos
        kwargs = dict(inputs_embeds=emb, attention_mask=self._attention_mask(c), position_ids=pos,
                      cache=self.cache, use_cache=self.cache is not None)
        return run_llm(self.model.llm, self.plain_head, c, last_only, **kwargs)

    def _attention_mask(self, c: int) -> Optional[torch.Tensor]:
        """The 2D mask of everything fed; for a one-token SDPA decode step, the ready ``(B, 1, 1, T)`` boolean mask
        on a padded batch (one query row attends to every valid key: no causal part to build), and no mask at all
        on a batch that was never padded (the row attends to every key). Either spares transformers rebuilding a 4D
        mask from the 2D one at every step, and checking the 2D one: that check asks whether a CUDA graph is
        being captured, which on a CUDA build of torch without a GPU driver raises and catches an error, ~75 us of
        a ~1.4 ms step of a 4-layer LLM at batch 1 (``bench/interventions.py``'s model: 9% of a 64-token call)."""
        mask = self.buffer[:, : self.length]
        if self.cache is None or c != 1 or not self.sdpa:
            return mask
        return mask.bool()[:, None, None, :] if self.padded else None


#: one compiled decode step at a time in the process: a step that skips most of Dynamo's guards does so through a
#: process-wide stance, which must not reach a step of another thread that has to be checked in full
_STEP_LOCK = threading.Lock()


class CompiledSteps:
    """A model's compiled one-token decode steps, built on first use and kept for later calls (the warm-up is
    paid once per batch size, and once more for its second cache length: :meth:`mark_length`). A copy of the model
    starts with none."""

    def __init__(self) -> None:
        self._steps: dict[tuple, Callable] = {}
        self._first_length: dict[tuple, int] = {}

    def __deepcopy__(self, memo: dict) -> "CompiledSteps":
        return CompiledSteps()

    @staticmethod
    def _key(model: "TaskMLLM") -> tuple[str, str]:
        """What a compiled step is specific to: the model's device type and attention implementation."""
        return model.device.type, model.llm.config._attn_implementation

    def get(self, model: "TaskMLLM") -> Callable:
        """The compiled step of ``model`` on its current device and attention implementation."""
        llm = model.llm
        key = self._key(model)
        if key not in self._steps:
            plain = _plain_head(llm)

            def step(emb, attend, pos, cache):
                mask = attention_bias(attend[:, None, None, :], llm, emb.dtype)
                return run_llm(llm, plain, 1, False, inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                               cache=cache, use_cache=True)

            if model.device.type == "cuda":  # CUDA graphs (torch.compile takes a mode or options, not both)
                self._steps[key] = torch.compile(step, mode="reduce-overhead", dynamic=False)
            else:
                self._steps[key] = torch.compile(step, dynamic=False, options=compile_options(model.device))
        return self._steps[key]

    @staticmethod
    def run(step: Callable, guarded: bool, *args: Any) -> Any:
        """Run a compiled step on ``args``. ``guarded=False`` evaluates only the guards that tell the step's
        compiled graphs apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``) and skips the rest:
        0.5-0.9 ms of a ~12 ms bf16 ``smol`` step on a CPU (6,761 guards on the model's modules and parameters).
        Only for a step whose decoder ran the step guarded before on the same cache within the same call, when
        nothing can have changed the model or torch's state (:class:`StaticDecoder` does this). A user's
        non-default stance is left alone (the step runs guarded)."""
        with _STEP_LOCK:
            stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None)
            if guarded or stance != "default":
                return step(*args)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step(*args)

    def mark_length(self, model: "TaskMLLM", cache: Any, attend: torch.Tensor) -> None:
        """Before a compiled step over a new cache: the first cache length of a batch size compiles a step for that
        length; any other length marks the length dimension of ``attend (B, L)`` and the cache's keys and values
        ``(B, H, L, D)`` dynamic, so that one more compile serves every later length (without it Dynamo compiles
        once per length, ~20 s for ``smol`` on a CPU, and runs eagerly after its recompile limit). The
        dynamic-length step is ~7% slower on ``smol`` (bf16, one thread)."""
        key = (*self._key(model), attend.shape[0])
        if self._first_length.setdefault(key, attend.shape[1]) == attend.shape[1]:
            return
        torch._dynamo.maybe_mark_dynamic(attend, 1)
        for layer in cache.layers:
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)


def attention_bias(allowed: torch.Tensor, llm: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A ``(B, 1, Q, K)`` boolean "may attend" mask in the form the LM's attention takes a ready 4D mask: as is for
    SDPA (and flex/flash-free backends that read booleans), additive (0 / the dtype's minimum) for eager."""
    if is_sdpa(llm.config._attn_implementation):
        return allowed
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def static_length(needed: int, context: int) -> int:
    """The static cache length for ``needed`` positions: rounded up to :data:`CACHE_BUCKET`, at most ``context``
    (but never below ``needed``)."""
    return max(needed, min(context, -(-needed // CACHE_BUCKET) * CACHE_BUCKET))


class StaticDecoder:
    """Feeds chunks through a preallocated ``StaticCache``; one-token steps run the model's compiled step.

    Every position of the batch is one cache column (shared by the rows, as the dynamic cache's); ``attend``
    ``(B, L_max)`` says which columns each row may read. A row also reads its own new column, so a padding row of
    a chunk attends to itself only (finite, and read by nobody). Attention reads all ``L_max`` columns at every
    step, so the cache starts at what a call usually needs (``capacity``: prompt + new tokens + one task's
    queries) and grows, by a copy into a cache twice as long, when more task queries arrive.

    Args:
        model: the TaskMLLM (its ``llm`` must support transformers' ``StaticCache``).
        batch_size, capacity: rows and the positions one call is expected to feed (the cache length is
            :func:`static_length` of it).
        compiled: run one-token steps through ``torch.compile`` (False: the same static path, eager).
    """

    def __init__(self, model: "TaskMLLM", batch_size: int, capacity: int, compiled: bool = True) -> None:
        llm = model.llm
        if not getattr(llm, "_can_compile_fullgraph", False) and compiled:
            raise ConfigError(f"compile=True needs a language model that supports transformers' StaticCache; "
                              f"{type(llm).__name__} does not")
        self.model = model
        self.fed = 0
        self.plain_head = _plain_head(llm)
        self.step = model.decode_steps.get(model) if compiled else None
        self.attend = torch.zeros(batch_size, 0, dtype=torch.bool, device=model.device)
        self.cache, self.length, self.marked = None, 0, False
        # whether a step ran guarded on the current cache: later steps of this call skip most guards (CPU only; on
        # CUDA the step's graphs are CUDA graphs, whose skipping is untested)
        self.checked = False
        self._allocate(static_length(capacity, max(capacity, model.processor.max_length)))

    def _allocate(self, length: int) -> None:
        """A ``StaticCache`` of ``length`` columns holding the columns fed so far (copied from the old one)."""
        from transformers import StaticCache

        old = self.cache
        self.cache = StaticCache(config=self.model.llm.config, max_cache_len=length)
        if old is not None and self.fed:
            for new_layer, old_layer in zip(self.cache.layers, old.layers):
                new_layer.lazy_initialization(old_layer.keys, old_layer.values)  # transformers' allocation
                new_layer.keys[:, :, : self.fed] = old_layer.keys[:, :, : self.fed]
                new_layer.values[:, :, : self.fed] = old_layer.values[:, :, : self.fed]
                new_layer.cumulative_length.fill_(self.fed)
        attend = torch.zeros(self.attend.shape[0], length, dtype=torch.bool, device=self.model.device)
        attend[:, : self.fed] = self.attend[:, : self.fed]
        self.attend, self.length, self.marked, self.checked = attend, length, False, False
        self.columns = torch.arange(length, device=self.model.device)

    def feed(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
             last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`DynamicDecoder.feed`."""
        c, t = mask.shape[1], self.fed
        if t + c > self.length:
            self._allocate(static_length(max(t + c, 2 * self.length), max(t + c, 2 * self.length)))
        valid = mask.bool()
        if c == 1 and self.step is not None:
            if not self.marked:  # the cache's tensors exist once the prompt is fed
                self.model.decode_steps.mark_length(self.model, self.cache, self.attend)
                self.marked = True
            self.attend[:, t] = True  # this step's own column, for every row
            logits, hidden = CompiledSteps.run(self.step, not self.checked, emb, self.attend, pos, self.cache)
            self.checked = self.model.device.type == "cpu"
            logits, hidden = logits.clone(), hidden.clone()  # the compiled step may reuse its output buffers
        else:
            self.attend[:, t: t + c] = True
            rows = self.columns[t: t + c]  # (C,) the chunk's columns
            causal = self.columns[None, :] <= rows[:, None]  # (C, L_max)
            own = self.columns[None, :] == rows[:, None]
            allowed = (self.attend[:, None, :] & causal[None]) | own[None]  # (B, C, L_max)
            allowed[:, :, t: t + c] &= valid[:, None, :] | own[None, :, t: t + c]
            bias = attention_bias(allowed[:, None], self.model.llm, emb.dtype)
            logits, hidden = run_llm(self.model.llm, self.plain_head, c, last_only, inputs_embeds=emb,
                                     attention_mask=bias, position_ids=pos, cache=self.cache,
                                     use_cache=True)
        self.attend[:, t: t + c] = valid  # what later positions may read of this chunk
        self.fed += c
        return logits, hidden


def make_decoder(model: "TaskMLLM", use_cache: bool, compile: bool, batch_size: int, capacity: int):
    """The decoder of one ``generate`` call (see the module docstring)."""
    if compile:
        return StaticDecoder(model, batch_size, capacity, compiled=True)
    return DynamicDecoder(model, use_cache, batch_size, capacity)

