"""The targets of the auxiliary losses, from the samples' generic ground truth: which visual tokens the
question's named regions cover (:func:`grounding_cover`) and which object label each token shows
(:func:`label_maps`). Any grounded source gives them: object masks or boxes, their labels, ``Sample.grounding``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from taskmllm.data.sample import Sample
from taskmllm.model.processor import sample_frames


def _frames(samples: Sequence[Sample], max_frames: int):
    """``(sample, frame index)`` of every frame the processor feeds, in its order (text-only samples have none)."""
    for s in samples:
        if s.frames is None and s.image is None:
            continue
        n = s.frames.shape[0] if s.frames is not None else 1
        for t in sample_frames(list(range(n)), max_frames):
            yield s, t


def grounding_cover(samples: Sequence[Sample], grid: tuple[int, int],
                    max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, how much of each token of ``grid`` the regions the question names cover.

    Returns ``(F, h*w)`` targets in [0, 1] — the area fraction covered by the union of the named objects'
    masks (boxes where there is no mask), doubled and capped at 1, so a token half covered counts as on it —
    and ``(F,)`` bool: the frame's sample has a :class:`~taskmllm.data.sample.Grounding`.
    """
    targets, valid = [], []
    for s, t in _frames(samples, max_frames):
        named = [o for o in s.objects if s.grounding is not None and o.id in s.grounding.objects]
        hit = np.zeros(s.hw, np.float32)
        for obj in named:
            m = obj.frame_mask(t, s.hw)
            if m is not None:
                hit = np.maximum(hit, m.astype(np.float32))
        cover = F.adaptive_avg_pool2d(torch.from_numpy(hit)[None, None], grid).flatten()
        targets.append((2 * cover).clamp(max=1.0))
        valid.append(s.grounding is not None)
    if not targets:
        return torch.zeros(0, grid[0] * grid[1]), torch.zeros(0, dtype=torch.bool)
    return torch.stack(targets), torch.tensor(valid)


def label_maps(samples: Sequence[Sample], grid: tuple[int, int], max_frames: int,
               classes: Mapping[str, Sequence[str]], min_cover: float = 0.5) -> dict[str, torch.Tensor]:
    """Per labelling kind, the ``(F, h*w)`` class index of each token of ``grid``: that of the object covering
    the largest fraction of it when that fraction is >= ``min_cover``, else 0 (background). An object's index is
    ``classes[kind].index(label) + 1``; an object with another label counts as background."""
    maps: dict[str, list[torch.Tensor]] = {kind: [] for kind in classes}
    ids = {kind: {c: i + 1 for i, c in enumerate(names)} for kind, names in classes.items()}
    n = grid[0] * grid[1]
    for s, t in _frames(samples, max_frames):
        masks, labels = [], {kind: [] for kind in classes}
        for obj in s.objects:
            m = obj.frame_mask(t, s.hw)
            if m is None:
                continue
            masks.append(m.astype(np.float32))
            for kind in classes:
                labels[kind].append(ids[kind].get(obj.label(kind), 0))
        if masks:
            cover = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(masks))[None], grid)[0].flatten(1)
            frac, which = cover.max(0)
            keep = frac >= min_cover
        for kind in classes:
            out = torch.zeros(n, dtype=torch.long)
            if masks:
                out[keep] = torch.tensor(labels[kind])[which[keep]]
            maps[kind].append(out)
    return {kind: torch.stack(v) if v else torch.zeros(0, n, dtype=torch.long) for kind, v in maps.items()}
