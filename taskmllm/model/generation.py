"""Our decode loop over a transformers causal LM: KV cache, greedy or sampled, batch > 1 with left padding.

After a sampled task token the loop feeds that token **and** its K query embeddings in the same step, so the
queries' last-layer hidden states (what the router hands to the expert) are computed exactly as in teacher
forcing. Samples in a batch feed chunks of different lengths; shorter chunks are padded with masked positions
that nothing attends to, and position ids skip them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Union

import torch

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.decoding import make_decoder
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.model.processor import Batch, positions
from taskmllm.schema import suggest

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM


@dataclass
class GenerationContext:
    """What an intervention sees of one ``generate`` call (no global state: one object per call).

    Attributes:
        input_ids: ``(B, L)`` prompt ids (left padded); attention_mask ``(B, L)``.
        image_mask: ``(B, L)`` True at visual-token positions of the prompt.
        inputs_embeds: ``(B, L, H)`` merged prompt embeddings.
        step: index of the token being produced (0 during the prefill).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    inputs_embeds: torch.Tensor
    step: int = 0


class Intervention(Protocol):
    """An inference-time change to the LLM (VAR, VHR): ``attach`` returns a context manager."""

    def attach(self, model: "TaskMLLM", context: GenerationContext) -> contextlib.AbstractContextManager: ...


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: per sample, the new ids (``<query>`` ids after each task token; EOS last if it stopped).
        text: per sample, the decoded new text (protocol tokens kept, ``<query>`` dropped).
        hidden_states: per sample ``(len(sequences[b]), H)`` on the model's device: the last-layer hidden state
            at the position where each new id was the input (zeros for a final id that was never fed).
        expert_inputs: what the batch offers its experts (vision features, the prompt's visual-token states,
            pixels; None for text-only).
    """

    sequences: list[list[int]]
    text: list[str]
    hidden_states: list[torch.Tensor]
    expert_inputs: Optional[ExpertInputs] = None


#: The keyword arguments of :func:`generate` besides the model, the batch and the intervention.
GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "generator", "use_cache",
                      "repetition_penalty", "no_repeat_ngram_size", "compile")


def check_generation(options: Mapping[str, Any], device: Optional[torch.device] = None) -> dict[str, Any]:
    """Generation keyword arguments checked before any compute; returns them normalized (ints, floats, bools).

    ``max_new_tokens`` an integer >= 1 (the context length bounds it further, see :func:`generate`);
    ``do_sample`` / ``use_cache`` / ``compile`` booleans; ``temperature`` and ``repetition_penalty`` finite numbers
    > 0; ``top_p`` in (0, 1]; ``no_repeat_ngram_size`` an integer >= 0;
    ``generator`` None or a ``torch.Generator`` on the model's ``device`` type.

    Raises:
        ConfigError: an unknown option (with the closest known one) or a value of the wrong type or range.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in GENERATION_OPTIONS:
            raise ConfigError(f"unknown generation option {key!r}{suggest(str(key), GENERATION_OPTIONS)}; known: "
                              f"{', '.join(GENERATION_OPTIONS)}")
        if key in ("max_new_tokens", "no_repeat_ngram_size"):
            low = 1 if key == "max_new_tokens" else 0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r} ({type(value).__name__})")
            value = int(value)
        elif key in ("do_sample", "use_cache", "compile"):
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be True or False, got {value!r} ({type(value).__name__})")
        elif key in ("temperature", "top_p", "repetition_penalty"):
            value = _check_positive(key, value, high=1.0 if key == "top_p" else None)
        elif value is not None:  # generator
            if not isinstance(value, torch.Generator):
                raise ConfigError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
            if device is not None and value.device.type != device.type:
                raise ConfigError(f"generator is on {value.device} but the model is on {device}; create it with "
                                  f"torch.Generator(device={str(device)!r})")
        out[key] = value
    return out


def _check_positive(key: str, value: Any, high: Optional[float] = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if not ok or value <= 0 or (high is not None and value > high):
        bound = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ConfigError(f"{key} must be a finite number {bound}, got {value!r} ({type(value).__name__})")
    return float(value)


def check_intervention(intervention: Any) -> None:
    """An ``intervention=`` must be None or an object with an ``attach(model, context)`` method.

    Raises:
        ConfigError: a class instead of an instance (``VHR`` for ``VHR()``), or an object without ``attach``.
    """
    if intervention is None:
        return
    if isinstance(intervention, type):
        raise ConfigError(f"intervention must be an instance, got the class {intervention.__name__}; "
                          f"pass {intervention.__name__}() instead")
    if not callable(getattr(intervention, "attach", None)):
        raise ConfigError(f"intervention must have an attach(model, context) method returning a context manager "
                          f"(VHR(), VAR(), ZeroTuning()), got {type(intervention).__name__}")


def _attached(intervention: Optional[Intervention], model: "TaskMLLM",
              ctx: GenerationContext) -> contextlib.AbstractContextManager:
    """``intervention.attach(model, ctx)``, checked to be a context manager (a null context without one)."""
    if intervention is None:
        return contextlib.nullcontext()
    session = intervention.attach(model, ctx)
    if not (hasattr(session, "__enter__") and hasattr(session, "__exit__")):
        raise ConfigError(f"{type(intervention).__name__}.attach returned {type(session).__name__}, not a context "
                          "manager (an object with __enter__ and __exit__)")
    return session


def pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` ids: argmax, or sampling with temperature and nucleus (top-p).

    The argmax of half-precision logits is taken on a float32 copy (the same ids, ties included: the cast is
    exact): PyTorch's CPU argmax is not vectorized for bf16, 158 vs 33 us (cast included) over SmolLM2's 49,152
    logits at one thread, ~1% of a bf16 decode step."""
    if not do_sample:
        return (logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits).argmax(-1)
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.double()  # float64 and the max subtracted first: no NaN at temperatures down to 5e-324
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def logits_processors(repetition_penalty: float, no_repeat_ngram_size: int):
    """transformers' own ``RepetitionPenaltyLogitsProcessor`` / ``NoRepeatNGramLogitsProcessor`` for the options
    that are on, as a ``LogitsProcessorList`` (None when both are off: 1.0 and 0)."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    out = LogitsProcessorList()
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        out.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    return out or None


def history(prompt: torch.Tensor, seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` ids each sample has seen: its prompt row (left padded, visual tokens expanded, as transformers'
    ``generate`` sees them) and its new ids (``<query>`` ids included), left padded with ``pad_id`` to one length."""
    rows = [prompt[b].tolist() + s for b, s in enumerate(seqs)]
    width = max(len(r) for r in rows)
    return torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)


def generate(model: "TaskMLLM", batch: Batch, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, intervention: Optional[Intervention] = None, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, compile: bool = False) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` sampled tokens per sample (query ids not counted).

    A sample also stops when the language model's context is full (``model.processor.max_length`` positions,
    prompt included): its last token is then one that could not be fed back, and a task token whose K queries
    would not fit is not emitted.

    Args:
        model: the TaskMLLM.
        batch: prompts from ``model.processor`` (left padded; labels ignored).
        do_sample, temperature, top_p, generator: sampling settings; greedy when ``do_sample`` is False.
        use_cache: False recomputes the whole sequence at every step (a reference for the cached path).
        intervention: a VAR/VHR/ZeroTuning object; attached for the duration of the call.
        repetition_penalty: transformers' ``RepetitionPenaltyLogitsProcessor`` (CTRL's rule: the logits of every id
            seen so far, prompt included, divided by it when positive, multiplied when negative); 1.0 = off.
        no_repeat_ngram_size: transformers' ``NoRepeatNGramLogitsProcessor``: no n-gram of this size occurs twice
            in prompt + answer; 0 = off.
        compile: a preallocated ``StaticCache`` and the one-token step compiled with ``torch.compile``
            (:mod:`taskmllm.model.decoding`); the first call per batch size and cache length pays the compilation.

    Raises:
        ConfigError: an option of the wrong type or range, or an intervention that is not one
            (:func:`check_generation`, :func:`check_intervention`); ``compile=True`` with ``use_cache=False`` or
            with an intervention (hooks and eager attention do not go into the compiled step).
    """
    opts = check_generation(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                 top_p=top_p, generator=generator, use_cache=use_cache,
                                 repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                 compile=compile), model.device)
    check_intervention(intervention)
    if compile and (intervention is not None or not use_cache):
        raise ConfigError("compile=True runs a static KV cache without hooks: it cannot be combined with "
                          f"{'an intervention' if intervention is not None else 'use_cache=False'}")
    if any(m.training for m in model.modules()):  # eval() walks every module: ~0.5 ms a call for the tiny model
        model.eval()
    batch = batch.to(model.device)
    feats, visual = (None, None) if batch.pixel_values is None else model.encode_images(batch.pixel_values)
    emb = model.embed(batch.input_ids, visual, batch.on_host().input_ids)  # positions read on the host copy
    ctx = GenerationContext(batch.input_ids, batch.attention_mask, batch.input_ids == model.image_id, emb)
    state = _State(model, batch, opts)
    with _attached(intervention, model, ctx):
        logits, prompt_hidden = state.decoder.feed(emb, batch.attention_mask, positions(batch.attention_mask),
                                                   last_only=True)
        inputs = model.expert_inputs(batch, feats, prompt_hidden)
        last: Optional[list[int]] = None  # None: every sample's last fed position is the chunk's last column
        while True:
            items = state.pick(logits, last)
            ctx.step += 1
            if not any(items[b] and (not state.done[b] or len(items[b]) > 1) for b in range(state.bsz)):
                break
            logits, last = state.feed(items)
            if all(state.done):
                break
    return _output(model, state.seqs, state.fed, inputs)


class _State:
    """One ``generate`` call's bookkeeping: the decoder, what each sample produced and where it stands."""

    def __init__(self, model: "TaskMLLM", batch: Batch, opts: dict[str, Any]) -> None:
        self.model, self.opts = model, opts
        mask = batch.attention_mask
        self.bsz = mask.shape[0]
        self.prompt = batch.on_host().input_ids
        self.seqs: list[list[int]] = [[] for _ in range(self.bsz)]
        self.fed: list[tuple[torch.Tensor, list[int]]] = []  # per step: chunk hidden (B, C, H), rows per sample
        self.done = [False] * self.bsz
        self.counts = [0] * self.bsz  # sampled tokens per sample (query ids not counted)
        self.next_pos = batch.on_host().attention_mask.sum(-1).tolist()
        self.context = model.processor.max_length
        queries = max((q.shape[0] for q in model.queries.values()), default=0)
        capacity = mask.shape[1] + opts["max_new_tokens"] + queries  # the usual need (a static cache grows)
        self.decoder = make_decoder(model, opts["use_cache"], opts["compile"], self.bsz, capacity)
        self.processors = logits_processors(opts["repetition_penalty"], opts["no_repeat_ngram_size"])

    def pick(self, logits: torch.Tensor, last: Optional[list[int]]) -> list[list[Union[int, torch.Tensor]]]:
        """Sample each row's next token from ``logits`` ``(B, C, V)`` at its ``last`` fed column; returns what
        each sample feeds next (:func:`_advance`)."""
        step = logits[:, -1] if last is None else logits[torch.arange(self.bsz), torch.tensor(last)]  # (B, V)
        if self.processors is not None:
            ids = history(self.prompt, self.seqs, self.model.processor.pad_id, step.device)
            step = self.processors(ids, step.float())
        o = self.opts
        toks = pick_tokens(step, o["do_sample"], o["temperature"], o["top_p"], o["generator"]).tolist()
        return [_advance(self.model, b, toks[b], self.seqs, self.counts, self.done, self.model.tokenizer.eos_token_id,
                         o["max_new_tokens"], room=self.context - self.next_pos[b]) for b in range(self.bsz)]

    def feed(self, items: list[list[Union[int, torch.Tensor]]]) -> tuple[torch.Tensor, Optional[list[int]]]:
        """Feed the samples' next items; returns the chunk's logits and each row's last fed column."""
        chunk, cmask, cpos = _chunk(self.model, items, self.next_pos)
        logits, hidden = self.decoder.feed(chunk, cmask, cpos)
        lengths = [len(x) for x in items]
        self.fed.append((hidden, lengths))  # sliced once at the end, not per sample per step
        self.next_pos = [p + n for p, n in zip(self.next_pos, lengths)]
        return logits, (None if chunk.shape[1] == 1 else [max(n - 1, 0) for n in lengths])


def _advance(model: "TaskMLLM", b: int, tok: int, seqs, counts, done, eos: int,
             max_new: int, room: int) -> list[Union[int, torch.Tensor]]:
    """Append the sampled token of sample ``b``; return what to feed next: the token id, then its queries.

    ``room``: context positions left to sample ``b``; a token that does not fit ends the sample (a task token
    whose queries do not fit is dropped: its expert would have no query states)."""
    if done[b]:
        return []
    task = model.task_ids.get(tok)
    need = 1 + (model.queries[task].shape[0] if task is not None else 0)
    if need > room:
        done[b] = True
        if task is None:
            seqs[b].append(tok)
            counts[b] += 1
        return []
    seqs[b].append(tok)
    counts[b] += 1
    if tok == eos:
        done[b] = True
        return []
    if counts[b] >= max_new:
        done[b] = True
    feed: list[Union[int, torch.Tensor]] = [tok]
    if task is not None:
        queries = model.queries[task]
        seqs[b] += [model.query_id] * queries.shape[0]
        feed += list(queries)
    return feed


def _chunk(model: "TaskMLLM", items: list[list[Union[int, torch.Tensor]]], next_pos: list[int]):
    """Right-pad per-sample items to ``(B, C, H)`` with masked pad positions; positions continue per sample."""
    embed = model.llm.get_input_embeddings()
    pad_id = model.processor.pad_id
    device = embed.weight.device
    c = max(len(x) for x in items)
    ids = torch.tensor([[x[0] if x else pad_id] for x in items], device=device)  # every row starts with a token
    emb = embed(ids)  # (B, 1, H)
    if c == 1:  # the common decode step: one token per sample
        mask = torch.tensor([[1 if x else 0] for x in items], device=device)  # a finished sample feeds nothing
        return emb, mask, torch.tensor(next_pos, device=device)[:, None]
    lengths = torch.tensor([len(x) for x in items], device=device)
    # query embeddings follow a task token; pad the other rows
    emb = torch.cat([emb, embed.weight[pad_id].expand(len(items), c - 1, -1).clone()], 1)
    for b, row in enumerate(items):
        if len(row) > 1:
            emb[b, 1: len(row)] = torch.stack(row[1:]).to(emb.dtype)
    mask = (torch.arange(c, device=device)[None] < lengths[:, None]).long()  # (B, C)
    offsets = torch.minimum(torch.arange(c, device=device)[None], (lengths - 1).clamp(min=0)[:, None])
    pos = torch.tensor(next_pos, device=device)[:, None] + offsets  # (B, C)
    return emb, mask, pos


def _output(model: "TaskMLLM", seqs, fed: list[tuple[torch.Tensor, list[int]]],
            inputs: Optional[ExpertInputs]) -> GenerationOutput:
    """Assemble per-sample hidden states from the per-step chunks (one gather per sample)."""
    hidden = []
    size = model.hidden_size
    every = torch.cat([h for h, _ in fed], 1) if fed else None  # (B, sum C, H)
    for b, seq in enumerate(seqs):
        index, offset = [], 0
        for h, lengths in fed:
            index += range(offset, offset + lengths[b])
            offset += h.shape[1]
        out = torch.zeros(len(seq), size, device=model.device, dtype=torch.float32 if every is None else every.dtype)
        if index:
            out[: len(index)] = every[b, index]
        hidden.append(out)
    text = [model.processor.decode(s) for s in seqs]
    return GenerationOutput(seqs, text, hidden, inputs)
