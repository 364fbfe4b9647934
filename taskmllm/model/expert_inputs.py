"""What a batch offers its experts: :class:`ExpertInputs`, built by :class:`~taskmllm.model.mllm.TaskMLLM`.

The model knows its vision grid, input size, pooling and where its visual tokens are; the experts know none of
that. A forward (teacher forcing) or a generation returns one ``ExpertInputs`` for the whole batch, every tensor
on the model's device, and the router slices it per call (``taskmllm.router.dispatch``) without reading the
model's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from taskmllm.errors import InputError


@dataclass
class ExpertInputs:
    """The batch's visual evidence for expert calls (F frames over all samples, in sample order).

    Attributes:
        features: ``(F, N, C)`` vision-tower patch features, N = h*w in row-major order.
        grid: ``(h, w)`` patch grid of ``features``.
        image_size: side of the square image the model saw, in pixels.
        frames_per_sample: frames each sample contributes (0 for a text-only sample).
        image_sizes: per sample, the original ``(height, width)`` of its first frame (None without an image).
        visual_states: ``(F, N', H)`` the LLM's last-layer hidden states at the visual tokens, or None.
        visual_grid: ``(h', w')`` grid of those tokens (the projector pools the patch grid).
        pixels: ``(F, 3, S, S)`` the frames as the tower saw them (normalized), or None.
    """

    features: torch.Tensor
    grid: tuple[int, int]
    image_size: int
    frames_per_sample: Sequence[int]
    image_sizes: Sequence[Optional[tuple[int, int]]]
    visual_states: Optional[torch.Tensor] = None
    visual_grid: Optional[tuple[int, int]] = None
    pixels: Optional[torch.Tensor] = None

    def frame_samples(self) -> torch.Tensor:
        """``(F,)`` the sample (batch row) of each row of ``features``, on the CPU."""
        counts = torch.as_tensor(list(self.frames_per_sample), dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def frames(self, sample: int) -> slice:
        """The rows of ``features`` (and ``visual_states``, ``pixels``) that hold sample ``sample``'s frames.

        Raises:
            InputError: the sample has no image (a task call about no image cannot run an expert).
        """
        count = self.frames_per_sample[sample]
        if count == 0:
            raise InputError(f"sample {sample} has a task call but no image")
        start = sum(self.frames_per_sample[:sample])
        return slice(start, start + count)
