"""VHR's text-only ("no-image") pass as extra tokens of the image pass's own forward.

VHR compares each head's output at the query position with and without the visual tokens. Without them the
prompt is its text tokens, left padded, at positions ``0 .. n-1`` (:func:`no_image_inputs`).

The text tokens **before the first visual token** (the prefix: BOS, system prompt, often the question) are the
same tokens at the same positions in both passes, and causal attention makes their keys and values at every layer
independent of what follows — VHR's reinforcement is applied to both passes alike, prefix included. So the
no-image pass need not recompute them: its tokens after the first visual token (the suffix, at positions
``p .. p+s-1``) can attend to the image pass's prefix columns directly (:func:`prefix_reuse_inputs`).

Both passes then run as **one forward**: the suffix is appended to the prompt as ``S`` extra columns, with a 4D
mask (:func:`packed_allowed`) under which the prompt's columns see only the prompt (as without VHR) and the extra
columns see their sample's prefix and the suffix before them, never a visual token. One pass over the weights
serves both (a separate no-image forward of a few tokens costs nearly what a long one does on a CPU: reading the
weights, not the arithmetic, sets its pace).

Layout of the packed forward for sample ``b`` (prompt of ``T`` columns, suffix ``s_b``, ``S = max s``)::

    columns     [ prompt: T columns (its own padding) | pad (S - s_b) | suffix s_b ]
    positions   [ the prompt's                        | p_b .. p_b + s_b - 1        ]
    the suffix attends to: prefix[b] (B, T) of the prompt's columns, and the suffix causally
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from taskmllm.errors import InputError
from taskmllm.model.generation import GenerationContext
from taskmllm.model.interventions.masks import last_real_positions
from taskmllm.model.processor import positions


@dataclass
class TextPass:
    """The no-image tokens appended to the prompt's forward.

    Attributes:
        inputs_embeds: ``(B, S, H)`` the text tokens computed, left padded.
        text_mask: ``(B, S)`` bool, true on each sample's tokens (false on its left padding).
        position_ids: ``(B, S)``.
        prefix: ``(B, L)`` bool over the prompt's columns: those the tokens read (each sample's real text before
            its first visual token); all false for a whole pass.
    """

    inputs_embeds: torch.Tensor
    text_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix: torch.Tensor

    @property
    def reuses_prefix(self) -> bool:
        """Whether the tokens read the prompt's prefix instead of computing it."""
        return bool(self.prefix.any())


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
    """The no-image pass computing every text token (reading no prompt column)."""
    emb, mask = no_image_inputs(ctx)
    return TextPass(emb, mask.bool(), positions(mask), torch.zeros_like(ctx.attention_mask, dtype=torch.bool))


def prefix_reuse_inputs(ctx: GenerationContext) -> Optional[TextPass]:
    """The no-image pass computing only the text after the first visual token; None when no sample has a prefix.

    Each sample's last real token is always computed (it is the pass's query position), so a prompt without
    visual tokens reuses everything but its last token.
    """
    real = ctx.attention_mask.bool()
    rows = torch.arange(real.shape[0], device=real.device)
    prefix = real & (ctx.image_mask.long().cumsum(-1) == 0)  # real tokens before the first visual token
    prefix[rows, last_real_positions(ctx.attention_mask)] = False
    if not bool(prefix.any()):
        return None
    p = prefix.sum(-1)  # (B,)
    emb, new = _left_pad(ctx.inputs_embeds, real & ~ctx.image_mask & ~prefix)
    s = new.sum(-1)
    # suffix positions continue the prefix's: p_b .. p_b + s_b - 1 (padding clamped to p_b)
    pos = (p.unsqueeze(-1) + torch.arange(new.shape[1], device=real.device) - (new.shape[1] - s).unsqueeze(-1))
    return TextPass(emb, new, pos.clamp(min=0), prefix)


def prompt_allowed(mask: Optional[torch.Tensor], batch: int, length: int, device: torch.device) -> torch.Tensor:
    """What each of the prompt's ``length`` columns may attend to in its own forward, from the mask the decoder
    was given: None (causal), a 2D padding mask ``(B, >= length)``, or a ready 4D mask ``(B, 1, length, >= length)``
    (boolean, or additive with 0 where allowed). Returns ``(B, length, length)`` bool; a row that may attend to
    nothing (left padding) attends to itself, so that it has one finite score (its output is read by no real
    token).

    Raises:
        InputError: a mask of another rank or with a head dimension other than 1.
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if mask is None:
        allowed = causal.expand(batch, -1, -1)
    elif mask.dim() == 2:
        allowed = causal[None] & mask[:, None, :length].bool()
    elif mask.dim() == 4 and mask.shape[1] == 1:
        own = mask[:, 0, :length, :length]
        allowed = own if own.dtype == torch.bool else own == 0
    else:
        raise InputError(f"VHR cannot read an attention mask of shape {tuple(mask.shape)} (expected None, "
                         f"(B, L) or (B, 1, Q, K))")
    lone = ~allowed.any(-1, keepdim=True)  # (B, T, 1) a row that may attend to nothing (left padding)
    return allowed | (lone & torch.eye(length, dtype=torch.bool, device=device))


def packed_allowed(prompt: torch.Tensor, text: TextPass) -> torch.Tensor:
    """The 4D "may attend" mask ``(B, 1, T + S, T + S)`` of a forward over the prompt's ``T`` columns followed by
    the text pass's ``S``: ``prompt`` ``(B, T, T)`` as given (the prompt never sees the extra columns); an extra
    column sees its sample's prefix columns, the suffix up to itself, and itself (also on padding)."""
    bsz, length, _ = prompt.shape
    s = text.text_mask.shape[1]
    prefix = torch.zeros(bsz, length, dtype=torch.bool, device=prompt.device)
    width = min(length, text.prefix.shape[1])  # a teacher-forced forward continues past the prompt
    prefix[:, :width] = text.prefix[:, :width]
    suffix = torch.ones(s, s, dtype=torch.bool, device=prompt.device).tril()[None] & text.text_mask[:, None, :]
    suffix |= torch.eye(s, dtype=torch.bool, device=prompt.device)
    top = torch.cat([prompt, prompt.new_zeros(bsz, length, s)], dim=-1)  # (B, T, T + S)
    bottom = torch.cat([prefix[:, None, :].expand(-1, s, -1), suffix], dim=-1)  # (B, S, T + S)
    return torch.cat([top, bottom], dim=1)[:, None]


def full_attention_for(config: Any, length: int) -> bool:
    """Whether every layer of the LM with ``config`` attends to all of ``length`` columns (full attention, or a
    sliding window at least that long), so that one 4D mask serves every layer of a packed forward."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= length


def is_empty_cache(cache: Any) -> bool:
    """Whether ``cache`` is a transformers cache holding no column yet (where a prompt's first forward starts)."""
    from transformers.cache_utils import Cache

    return isinstance(cache, Cache) and cache.get_seq_length() == 0


def keep_prompt_columns(packed: Any, target: Any, length: int) -> None:
    """Move the prompt's ``length`` columns of every layer of the packed forward's ``DynamicCache`` into the
    caller's ``target`` cache (appended, as the prompt's own forward would have written them).

    Raises:
        InputError: the packed cache holds fewer columns than the prompt.
    """
    for index, layer in enumerate(packed.layers):
        keys, values = layer.keys, layer.values
        if keys is None or keys.shape[2] < length:
            raise InputError(f"VHR's packed forward left {0 if keys is None else keys.shape[2]} columns at layer "
                             f"{index}, fewer than the prompt's {length}")
        target.update(keys[:, :, :length], values[:, :, :length], index)
