"""Scoped hooks on a transformers causal LM: where its decoder layers, attention modules and ``o_proj`` are.

Interventions never fork modeling code: they find the decoder layers of ``model.llm`` (Llama, Mistral, Qwen2,
Gemma, ... — any model whose decoder exposes ``layers`` and whose layers hold ``self_attn.o_proj``), register
torch hooks for the duration of a ``with`` block and remove every one of them on exit, also after an exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.generation import GenerationContext
from taskmllm.model.processor import Batch

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM, in order."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"cannot find the decoder layers of {type(llm).__name__} (expected `.get_decoder().layers`)")
    return list(layers)


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer."""
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise ConfigError(f"decoder layer {type(layer).__name__} has no `self_attn`")
    return attn


def output_projection(layer: nn.Module) -> nn.Module:
    """The attention output projection (``o_proj``) of one decoder layer; its input is the concatenated heads."""
    proj = getattr(attention_module(layer), "o_proj", None)
    if proj is None:
        raise ConfigError(f"the attention of {type(layer).__name__} has no `o_proj`; VHR needs the per-head outputs")
    return proj


def head_layout(llm: nn.Module) -> tuple[int, int]:
    """``(num_attention_heads, head_dim)`` of the LM's attention."""
    cfg = llm.config
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, int(head_dim)


def resolve_layers(layers: Optional[list[int]], num_layers: int) -> list[int]:
    """Normalise (negative indices allowed) and validate layer indices; sorted and unique."""
    out = sorted({(i + num_layers) if i < 0 else i for i in (layers or [])})
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
    return out


class HookSet:
    """Registers torch hooks and removes them all at once (``remove`` is idempotent)."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def forward_pre(self, module: nn.Module, fn: Callable, with_kwargs: bool = False,
                    prepend: bool = False) -> RemovableHandle:
        """Register a forward pre-hook; its handle may also be removed early (removing twice is harmless)."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self.handles.append(handle)
        return handle

    def forward(self, module: nn.Module, fn: Callable) -> RemovableHandle:
        """Register a forward hook (it may replace the module's output)."""
        handle = module.register_forward_hook(fn)
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def context_for(model: "TaskMLLM", batch: Batch) -> GenerationContext:
    """The :class:`GenerationContext` of a batch (what ``generate`` builds), for use outside ``generate``.

    Lets an intervention wrap a teacher-forced ``model(batch)`` (e.g. scoring yes/no logits): the first LM
    forward inside the block must start with this batch's prompt.
    """
    batch = batch.to(model.device)
    with torch.no_grad():
        visual = None if batch.pixel_values is None else model.encode_images(batch.pixel_values)[1]
        emb = model.embed(batch.input_ids, visual)
    return GenerationContext(batch.input_ids, batch.attention_mask, batch.input_ids == model.image_id, emb)


def as_context(model: "TaskMLLM", context: GenerationContext | Batch) -> GenerationContext:
    """Accept a :class:`GenerationContext` or a :class:`Batch`."""
    if isinstance(context, GenerationContext):
        return context
    if isinstance(context, Batch):
        return context_for(model, context)
    raise InputError(f"expected a GenerationContext or a Batch, got {type(context).__name__}")
