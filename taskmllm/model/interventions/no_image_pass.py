"""The inputs of VHR's text-only ("no-image") pass, whole or reusing the image pass's prefix.

VHR compares each head's output at the query position with and without the visual tokens. Without them the
prompt is its text tokens, left padded, at positions ``0 .. n-1`` (:func:`no_image_inputs`).

The text tokens **before the first visual token** (the prefix: BOS, system prompt, often the question) are the
same tokens at the same positions in both passes, and causal attention makes their keys and values at every layer
independent of what follows — VHR's reinforcement is applied to both passes alike, prefix included. So the
no-image pass need not recompute them: it can read the prefix's keys and values of each layer from the image
pass's KV cache once that layer has run, and feed only the text **after** the first visual token (the suffix,
at positions ``p .. p+s-1``) (:func:`prefix_reuse_inputs`). The result is the same up to float rounding (the two
passes compute the prefix in batches of different shapes); the cost is the suffix's, not the whole prompt's.

Layout of a reuse pass for sample ``b`` (prefix ``p_b`` tokens, suffix ``s_b``), ``P = max p``, ``S = max s``::

    cache columns   [ pad (P - p_b) | prefix p_b ]   <- the image pass's columns ``prefix_columns[b]``
    new tokens      [ pad (S - s_b) | suffix s_b ]   <- ``inputs_embeds[b]``, positions p_b .. p_b+s_b-1
    attention_mask  (B, P + S): 1 on the prefix and the suffix, 0 on both pads
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from taskmllm.errors import InputError
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.masks import first_real_positions, last_real_positions
from taskmllm.model.processor import positions


@dataclass
class TextPass:
    """One no-image pass: what the decoder is fed.

    Attributes:
        inputs_embeds: ``(B, S, H)`` the text tokens it computes, left padded.
        attention_mask: ``(B, P + S)`` the reused prefix columns (``P = 0`` for a whole pass), then the new tokens.
        position_ids: ``(B, S)``.
        prefix_columns: ``(B, P)`` the image pass's columns whose keys and values fill the prefix (any valid column
            on padding); None for a whole pass.
        source_length: ``L``, the image pass's prompt length (its cache must hold at least these columns).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_columns: Optional[torch.Tensor] = None
    source_length: int = 0

    @property
    def prefix_length(self) -> int:
        """``P``: the cache columns the pass starts with."""
        return 0 if self.prefix_columns is None else self.prefix_columns.shape[1]


def _left_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, width)`` bool, true on each row's last ``lengths[b]`` columns."""
    return torch.arange(width, device=lengths.device) >= (width - lengths).unsqueeze(-1)


def _left_pad(embeds: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, H)`` rows and a ``(B, L)`` bool selection -> the selected rows of each sample, left padded to the
    longest: ``(B, N, H)`` and their ``(B, N)`` bool mask."""
    lengths = keep.sum(-1)
    width = int(lengths.max())
    # the j-th kept token of sample b goes to column (width - n_b) + j
    dest = (width - lengths).unsqueeze(-1) + keep.long().cumsum(-1) - 1  # (B, L)
    rows, cols = keep.nonzero(as_tuple=True)
    out = embeds.new_zeros(embeds.shape[0], width, embeds.shape[-1])
    out[rows, dest[rows, cols]] = embeds[rows, cols]
    return out, _left_padding_mask(lengths, width)


def no_image_inputs(ctx: GenerationContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt with its visual tokens removed, left padded: embeddings ``(B, L0, H)`` and mask ``(B, L0)``."""
    emb, mask = _left_pad(ctx.inputs_embeds, ctx.attention_mask.bool() & ~ctx.image_mask)
    return emb, mask.to(ctx.attention_mask.dtype)


def whole_pass(ctx: GenerationContext) -> TextPass:
    """The no-image pass computing every text token (used when the image pass keeps no reusable cache)."""
    emb, mask = no_image_inputs(ctx)
    return TextPass(emb, mask, positions(mask))


def prefix_reuse_inputs(ctx: GenerationContext) -> Optional[TextPass]:
    """The no-image pass computing only the text after the first visual token; None when no sample has a prefix.

    Each sample's last real token is always computed (it is the pass's query position), so a prompt without
    visual tokens reuses everything but its last token.
    """
    real = ctx.attention_mask.bool()
    bsz, length = real.shape
    rows = torch.arange(bsz, device=real.device)
    prefix = real & (ctx.image_mask.long().cumsum(-1) == 0)  # real tokens before the first visual token
    prefix[rows, last_real_positions(ctx.attention_mask)] = False
    p = prefix.sum(-1)  # (B,)
    width = int(p.max())
    if width == 0:
        return None
    emb, new = _left_pad(ctx.inputs_embeds, real & ~ctx.image_mask & ~prefix)
    s = new.sum(-1)
    # suffix positions continue the prefix's: p_b .. p_b + s_b - 1 (padding clamped to p_b)
    pos = (p.unsqueeze(-1) + torch.arange(new.shape[1], device=real.device) - (new.shape[1] - s).unsqueeze(-1))
    pos = pos.clamp(min=0)
    # worker column j of sample b holds the prefix token j - (P - p_b), at image column first_b + that index
    first = first_real_positions(ctx.attention_mask)  # (B,)
    cols = first.unsqueeze(-1) + torch.arange(width, device=real.device) - (width - p).unsqueeze(-1)
    mask = torch.cat([_left_padding_mask(p, width), new], dim=-1).to(ctx.attention_mask.dtype)
    return TextPass(emb, mask, pos, cols.clamp(0, length - 1), length)


def is_full_attention_cache(cache: Any, num_layers: int) -> bool:
    """Whether ``cache`` is an empty transformers cache whose first ``num_layers`` layers keep every column at its
    prompt index (``DynamicLayer`` or ``StaticLayer``; sliding or compressed layers are not reusable)."""
    from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

    if not isinstance(cache, Cache) or cache.get_seq_length() != 0:
        return False
    layers = getattr(cache, "layers", [])
    if len(layers) < num_layers and getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer:
        return False
    return all(type(layer) in (DynamicLayer, StaticLayer) for layer in layers[:num_layers])


def prefix_cache(text: TextPass, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """A ``DynamicCache`` with ``P`` placeholder columns on each of ``num_layers`` layers (filled by
    :func:`copy_prefix` before that layer's attention runs); its length sets the pass's causal mask."""
    from transformers import DynamicCache

    shape = (text.prefix_columns.shape[0], kv_heads, text.prefix_length, head_dim)
    device = text.inputs_embeds.device
    return DynamicCache(ddp_cache_data=[(torch.zeros(shape, dtype=dtype, device=device),
                                         torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)])


def copy_prefix(target: Any, source: Any, layer: int, text: TextPass) -> None:
    """Copy the image pass's keys and values of ``text.prefix_columns`` at ``layer`` into the placeholders.

    Raises:
        InputError: the image pass's cache has fewer samples, heads or columns than the pass expects.
    """
    src, dst = source.layers[layer], target.layers[layer]
    keys, values = getattr(src, "keys", None), getattr(src, "values", None)
    if keys is None or keys.shape[:2] != dst.keys.shape[:2] or keys.shape[-1] != dst.keys.shape[-1] \
            or keys.shape[2] < text.source_length or keys.dtype != dst.keys.dtype:
        shape = None if keys is None else (tuple(keys.shape), keys.dtype)
        raise InputError(f"VHR cannot reuse the image pass's layer-{layer} cache of shape {shape} for a prefix of "
                         f"{tuple(dst.keys.shape)}")
    index = text.prefix_columns.to(keys.device)[:, None, :, None].expand(-1, dst.keys.shape[1], -1, dst.keys.shape[-1])
    torch.gather(keys, 2, index, out=dst.keys)
    torch.gather(values, 2, index, out=dst.values)
