"""Where the answer looked: the answer's attention to the visual tokens, on the LLM's visual-token grid.

For each sample: the answer (generated greedily under the intervention, or given) is appended to the prompt and
run teacher-forced with eager attention (weights materialized) under the same intervention, attached for the
prompt. The rows are the positions that **predict** each answer token (the last prompt token and every answer
token but the last); the map is their attention to the sample's visual tokens, averaged over those rows and over
the chosen (layer, head) pairs, reshaped to the projector's pooled grid ``(h, w)`` — one frame — or
``(F, h, w)`` for a video. Values are attention mass (a visual token's share of its row), not normalised, so maps
with and without an intervention compare directly; an overlay normalises for display.

Heads: every head of ``layers`` (None = all layers); an explicit ``{layer: [head, ...]}`` or
``{layer: (B, heads) bool}``; or ``"selected"``: the heads the intervention acted on — VHR's reinforced heads,
VAR's heads with a redistributed row, ZeroTuning's scaled heads. :func:`compare_attention_maps` computes the maps
with and without the intervention over the same heads.

The LM's attention implementation is switched to eager for the teacher-forced pass and restored afterwards (also
after an exception).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.interventions.hooks import context_for, decoder_layers, head_layout, resolve_layers
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.generation import Intervention
    from taskmllm.model.mllm import TaskMLLM

HeadSpec = Union[None, Literal["selected"], Mapping[int, Union[Sequence[int], torch.Tensor]]]


@dataclass
class AttentionMaps:
    """Per-sample maps of one run.

    Attributes:
        maps: per sample a float32 ``(h, w)`` array (``(F, h, w)`` for ``F > 1`` frames); None for a sample
            without visual tokens or without a chosen head.
        answers: per sample the answer token ids whose predicting rows were averaged.
        heads: ``{layer: (B, heads) bool}`` the (layer, head) pairs averaged, per sample.
    """

    maps: list[Optional[np.ndarray]]
    answers: list[list[int]]
    heads: dict[int, torch.Tensor]


@contextlib.contextmanager
def eager_attention(model: "TaskMLLM") -> Iterator[None]:
    """Switch the LM to eager attention for the block (weights materialized), then restore its implementation."""
    previous = model.llm.config._attn_implementation
    if previous != "eager":
        model.llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.llm.set_attn_implementation(previous)


def selected_heads(intervention: "Intervention", num_layers: int, num_heads: int, batch_size: int
                   ) -> dict[int, torch.Tensor]:
    """``{layer: (B, heads) bool}`` the heads an intervention acted on in its most recent attach."""
    from taskmllm.model.interventions.var import VAR
    from taskmllm.model.interventions.vhr import VHR
    from taskmllm.model.interventions.zerotuning import ZeroTuning

    if isinstance(intervention, VHR):
        return {layer: s.bool().cpu() for layer, s in intervention.selected_heads.items()}
    if isinstance(intervention, VAR):
        return {layer: (c > 0).cpu() for layer, c in intervention.selected_counts.items()}
    if isinstance(intervention, ZeroTuning):
        return {layer: (g != 1.0)[None].expand(batch_size, -1).clone()
                for layer, g in intervention.head_gammas(num_layers, num_heads).items()}
    raise ConfigError(f"heads='selected' needs a VHR, VAR or ZeroTuning intervention, got "
                      f"{type(intervention).__name__}")


def _head_masks(spec: HeadSpec, layers: Optional[Sequence[int]], num_layers: int, num_heads: int,
                batch_size: int) -> Optional[dict[int, torch.Tensor]]:
    """The head spec as ``{layer: (B, heads) bool}`` (None for ``"selected"``: known after the run)."""
    if spec == "selected":
        return None
    if spec is None:
        chosen = resolve_layers(list(range(num_layers)) if layers is None else list(layers), num_layers)
        return {layer: torch.ones(batch_size, num_heads, dtype=torch.bool) for layer in chosen}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"heads must be None, 'selected' or {{layer: heads}}, got {spec!r}")
    out = {}
    for layer, heads in spec.items():
        (idx,) = resolve_layers([int(layer)], num_layers)
        if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
            if tuple(heads.shape) != (batch_size, num_heads):
                raise ConfigError(f"head mask of layer {layer} must be {(batch_size, num_heads)}, got "
                                  f"{tuple(heads.shape)}")
            out[idx] = heads.cpu()
            continue
        mask = torch.zeros(batch_size, num_heads, dtype=torch.bool)
        for h in list(heads):
            if not 0 <= int(h) < num_heads:
                raise ConfigError(f"head {h} of layer {layer} is out of range ({num_heads} heads)")
            mask[:, int(h)] = True
        out[idx] = mask
    return out


def _answers(model: "TaskMLLM", batch: Batch, intervention: Optional["Intervention"],
             answers: Optional[Sequence[Sequence[int]]], max_new_tokens: int) -> list[list[int]]:
    if answers is None:
        return [list(s) for s in model.generate(batch, max_new_tokens=max_new_tokens,
                                                intervention=intervention).sequences]
    if len(answers) != batch.input_ids.shape[0]:
        raise InputError(f"{len(answers)} answers for a batch of {batch.input_ids.shape[0]}")
    return [[int(t) for t in a] for a in answers]


@torch.no_grad()
def attention_maps(model: "TaskMLLM", batch: Batch, intervention: Optional["Intervention"] = None,
                   answers: Optional[Sequence[Sequence[int]]] = None, layers: Optional[Sequence[int]] = None,
                   heads: HeadSpec = None, max_new_tokens: int = 16) -> AttentionMaps:
    """The answer's attention to the visual tokens, per sample (see the module docstring).

    Args:
        model: the TaskMLLM; batch: prompts from ``model.processor`` (left padded, as for ``generate``).
        intervention: applied to the generation and the teacher-forced pass (None = the plain model).
        answers: per sample the answer token ids; None = generate them greedily (``max_new_tokens``).
        layers: layers whose heads are averaged when ``heads`` is None (None = all).
        heads: None, ``"selected"`` or ``{layer: [head, ...] | (B, heads) bool}``.

    Returns:
        :class:`AttentionMaps` (maps on the visual-token grid, the answers, the heads averaged).
    """
    if heads == "selected" and intervention is None:
        raise ConfigError("heads='selected' needs an intervention")
    model.eval()
    batch = batch.to(model.device)
    num_layers, (num_heads, _) = len(decoder_layers(model.llm)), head_layout(model.llm)
    bsz, prompt_len = batch.input_ids.shape
    masks = _head_masks(heads, layers, num_layers, num_heads, bsz)
    ans = _answers(model, batch, intervention, answers, max_new_tokens)
    fed = [a[:-1] for a in ans]  # the last answer token is predicted, never fed
    width = max((len(a) for a in fed), default=0)
    pad = model.processor.pad_id
    extra_ids = torch.full((bsz, width), pad, dtype=torch.long, device=model.device)
    extra_mask = torch.zeros(bsz, width, dtype=batch.attention_mask.dtype, device=model.device)
    for b, a in enumerate(fed):
        extra_ids[b, :len(a)] = torch.tensor(a, dtype=torch.long)
        extra_mask[b, :len(a)] = 1
    full = Batch(torch.cat([batch.input_ids, extra_ids], 1), torch.cat([batch.attention_mask, extra_mask], 1),
                 None, batch.pixel_values, list(batch.frames_per_sample), list(batch.image_sizes))
    from taskmllm.model.processor import positions

    with eager_attention(model):
        ctx_full = context_for(model, full)
        attach = intervention.attach(model, batch) if intervention is not None else contextlib.nullcontext()
        with attach:
            out = model.llm(inputs_embeds=ctx_full.inputs_embeds, attention_mask=full.attention_mask,
                            position_ids=positions(full.attention_mask), output_attentions=True, use_cache=False)
    if masks is None:
        masks = selected_heads(intervention, num_layers, num_heads, bsz)
    grid = model.projector.pooled_grid(model.vision.grid)
    image = batch.input_ids == model.image_id  # (B, L)
    maps: list[Optional[np.ndarray]] = []
    for b in range(bsz):
        cols = image[b].nonzero().flatten()
        pairs = [(layer, h) for layer, m in sorted(masks.items()) for h in m[b].nonzero().flatten().tolist()]
        if len(cols) == 0 or not pairs:
            maps.append(None)
            continue
        rows = torch.arange(prompt_len - 1, prompt_len + len(fed[b]), device=model.device)  # predict each answer token
        acc = torch.zeros(len(cols), dtype=torch.float32, device=model.device)
        for layer, h in pairs:
            weights = out.attentions[layer][b, h]  # (T, T)
            acc += weights.index_select(0, rows).index_select(1, cols).float().mean(0)
        frames = len(cols) // (grid[0] * grid[1])
        arr = (acc / len(pairs)).reshape(frames, grid[0], grid[1]).cpu().numpy()
        maps.append(arr[0] if frames == 1 else arr)
    return AttentionMaps(maps, ans, {layer: m.clone() for layer, m in masks.items()})


def compare_attention_maps(model: "TaskMLLM", batch: Batch, intervention: "Intervention",
                           layers: Optional[Sequence[int]] = None, heads: HeadSpec = "selected",
                           max_new_tokens: int = 16) -> tuple[AttentionMaps, AttentionMaps]:
    """``(with, without)``: each run's own greedy answer, averaged over the same heads (by default the heads the
    intervention selected in its run)."""
    with_iv = attention_maps(model, batch, intervention, layers=layers, heads=heads, max_new_tokens=max_new_tokens)
    without = attention_maps(model, batch, None, heads=with_iv.heads, max_new_tokens=max_new_tokens)
    return with_iv, without
