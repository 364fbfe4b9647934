"""A tiny joint-training loop for the overfit tests: patch embedding + learnable query states + one expert."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from taskmllm.experts import Expert, ExpertPrompt, TaskTarget, VisionFeatures
from tests.experts.shapes import PatchEmbed


@dataclass
class OverfitRun:
    """What a run reached: the metric history (step, value), the CPU seconds used and the last outputs."""

    steps: int = 0
    metric: float = float("-inf")
    history: list[tuple[int, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    outputs: object = None


def overfit(
    expert: Expert,
    pixels: torch.Tensor,
    targets: Sequence[TaskTarget],
    metric: Callable[[object], float],
    goal: float,
    patch: int,
    max_steps: int,
    lr: float = 3e-3,
    prompts: Optional[Sequence[ExpertPrompt]] = None,
    eval_every: int = 10,
    seed: int = 0,
) -> OverfitRun:
    """Train expert, a PatchEmbed and free query states jointly with Adam until ``metric(outputs) > goal``.

    ``pixels``: ``(M, T, 3, S, S)`` images (T = 1) or videos. ``metric`` gets the expert's outputs.
    """
    torch.manual_seed(seed)
    m, t, _, size, _ = pixels.shape
    grid = (size // patch, size // patch)
    embed = PatchEmbed(expert.vision_dim, patch)
    queries = torch.nn.Parameter(torch.randn(m, expert.num_queries, expert.hidden_size))
    opt = torch.optim.Adam([*expert.parameters(), *embed.parameters(), queries], lr=lr)
    run = OverfitRun()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    flat = pixels.flatten(0, 1)
    for step in range(1, max_steps + 1):
        feats = embed(flat).reshape(m, t, grid[0] * grid[1], -1)
        outputs = expert(queries, VisionFeatures(feats, grid, size), prompts)
        loss = sum(expert.loss(outputs, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            with torch.no_grad():
                feats = embed(flat).reshape(m, t, grid[0] * grid[1], -1)
                run.outputs = expert(queries, VisionFeatures(feats, grid, size), prompts)
                value = metric(run.outputs)
            run.history.append((step, value))
            run.steps, run.metric = step, value
            if value > goal:
                break
    run.cpu_seconds = time.process_time() - cpu0
    run.wall_seconds = time.perf_counter() - wall0
    return run
