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
GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "generator", "use_cache")


def check_generation(options: Mapping[str, Any], device: Optional[torch.device] = None) -> dict[str, Any]:
    """Generation keyword arguments checked before any compute; returns them normalized (ints, floats, bools).

    ``max_new_tokens`` an integer >= 1 (the context length bounds it further, see :func:`generate`);
    ``do_sample`` / ``use_cache`` booleans; ``temperature`` a finite number > 0; ``top_p`` in (0, 1];
    ``generator`` None or a ``torch.Generator`` on the model's ``device`` type.

    Raises:
        ConfigError: an unknown option (with the closest known one) or a value of the wrong type or range.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in GENERATION_OPTIONS:
            raise ConfigError(f"unknown generation option {key!r}{suggest(str(key), GENERATION_OPTIONS)}; known: "
                              f"{', '.join(GENERATION_OPTIONS)}")
        if key == "max_new_tokens":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"max_new_tokens must be an integer >= 1, got {value!r} ({type(value).__name__})")
            value = int(value)
        elif key in ("do_sample", "use_cache"):
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be True or False, got {value!r} ({type(value).__name__})")
        elif key in ("temperature", "top_p"):
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
    """``(B, V)`` logits -> ``(B,)`` ids: argmax, or sampling with temperature and nucleus (top-p)."""
    if not do_sample:
        return logits.argmax(-1)
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


class _Decoder:
    """Feeds chunks to the LLM, with a KV cache or by recomputing the whole sequence."""

    def __init__(self, model: "TaskMLLM", use_cache: bool) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.llm.config) if use_cache else None
        self.mask: Optional[torch.Tensor] = None  # (B, T) of everything fed so far
        self.emb: Optional[torch.Tensor] = None  # (B, T, H), only without cache
        self.pos: Optional[torch.Tensor] = None
        cfg = model.llm.config  # logits = lm_head(hidden) unless the LM scales or soft-caps them
        self.plain_head = getattr(cfg, "final_logit_softcapping", None) is None and not hasattr(cfg, "logit_scale")

    def feed(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
             last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``(B, C, H)`` embeddings; returns logits ``(B, C, V)`` and last hidden ``(B, C, H)`` of the chunk.

        ``last_only`` (the left-padded prefill, whose rows all end in the last column): logits ``(B, 1, V)`` of
        the last position only, as transformers' ``logits_to_keep=1``.
        """
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], 1)
        if self.cache is None:
            self.emb = emb if self.emb is None else torch.cat([self.emb, emb], 1)
            self.pos = pos if self.pos is None else torch.cat([self.pos, pos], 1)
            emb, pos = self.emb, self.pos
        llm, c = self.model.llm, mask.shape[1]
        kwargs = dict(inputs_embeds=emb, attention_mask=self._attention_mask(c), position_ids=pos,
                      past_key_values=self.cache, use_cache=self.cache is not None)
        if self.plain_head:  # decoder + lm_head on the chunk: no hidden-state capture of every layer
            hidden = llm.get_decoder()(**kwargs).last_hidden_state[:, -c:]  # (B, C, H) after the final norm
            return llm.get_output_embeddings()(hidden[:, -1:] if last_only else hidden), hidden
        out = llm(**kwargs, output_hidden_states=True)
        return out.logits[:, -c:], out.hidden_states[-1][:, -c:]

    def _attention_mask(self, c: int) -> torch.Tensor:
        """The 2D mask of everything fed, or for a one-token SDPA decode step on a padded batch the ready
        ``(B, 1, 1, T)`` boolean mask (one query row attends to every valid key: no causal part to build), which
        spares transformers rebuilding a 4D mask from the 2D one at every step."""
        sdpa = self.model.llm.config._attn_implementation == "sdpa"
        if self.cache is None or c != 1 or not sdpa or bool(self.mask.all()):
            return self.mask
        return self.mask.bool()[:, None, None, :]


def generate(model: "TaskMLLM", batch: Batch, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, intervention: Optional[Intervention] = None) -> GenerationOutput:
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

    Raises:
        ConfigError: an option of the wrong type or range, or an intervention that is not one
            (:func:`check_generation`, :func:`check_intervention`).
    """
    opts = check_generation(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                 top_p=top_p, generator=generator, use_cache=use_cache), model.device)
    check_intervention(intervention)
    max_new_tokens, do_sample, temperature, top_p = (opts[k] for k in ("max_new_tokens", "do_sample", "temperature",
                                                                       "top_p"))
    model.eval()
    batch = batch.to(model.device)
    feats, visual = (None, None) if batch.pixel_values is None else model.encode_images(batch.pixel_values)
    emb = model.embed(batch.input_ids, visual, batch.on_host().input_ids)  # positions read on the host copy
    mask = batch.attention_mask
    ctx = GenerationContext(batch.input_ids, mask, batch.input_ids == model.image_id, emb)
    eos = model.tokenizer.eos_token_id
    bsz = mask.shape[0]
    seqs: list[list[int]] = [[] for _ in range(bsz)]
    fed: list[tuple[torch.Tensor, list[int]]] = []  # per step: chunk hidden (B, C, H), rows fed per sample
    done = [False] * bsz
    counts = [0] * bsz  # sampled tokens per sample (query ids not counted)
    next_pos = mask.sum(-1).tolist()
    context = model.processor.max_length
    decoder = _Decoder(model, use_cache)
    with _attached(intervention, model, ctx):
        logits, prompt_hidden = decoder.feed(emb, mask, positions(mask), last_only=True)
        inputs = model.expert_inputs(batch, feats, prompt_hidden)
        last = [logits.shape[1] - 1] * bsz
        while True:
            # (B, V): the last fed position of each sample
            step_logits = logits[:, 0] if logits.shape[1] == 1 else logits[torch.arange(bsz), torch.tensor(last)]
            toks = pick_tokens(step_logits, do_sample, temperature, top_p, generator).tolist()
            items: list[list[torch.Tensor]] = []
            for b in range(bsz):
                items.append(_advance(model, b, toks[b], seqs, counts, done, eos, max_new_tokens,
                                      room=context - next_pos[b]))
            ctx.step += 1
            needs_feed = [b for b in range(bsz) if items[b] and (not done[b] or len(items[b]) > 1)]
            if not needs_feed:
                break
            chunk, cmask, cpos = _chunk(model, items, next_pos)
            logits, hidden = decoder.feed(chunk, cmask, cpos)
            lengths = [len(x) for x in items]
            fed.append((hidden, lengths))  # sliced once at the end, not per sample per step
            next_pos = [p + n for p, n in zip(next_pos, lengths)]
            last = [max(n - 1, 0) for n in lengths]
            if all(done):
                break
    return _output(model, seqs, fed, inputs)


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
