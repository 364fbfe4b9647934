"""``taskmllm data preview``: a grid of ShapesWorld samples cycling through every conversation task."""

from __future__ import annotations

from taskmllm.data.preview import render_preview
from taskmllm.data.shapesworld.conversations import IMAGE_TASKS, VIDEO_TASKS
from taskmllm.data.shapesworld.source import TaskSource
from taskmllm.data.shapesworld.world import ShapesWorld


def preview_main(n: int = 16, out: str = "grid.png", seed: int = 0, split: str = "train") -> str:
    """Render ``n`` ShapesWorld samples cycling through every task to ``out`` (the CLI's ``data preview``)."""
    world = ShapesWorld(seed=seed)
    tasks = IMAGE_TASKS + VIDEO_TASKS
    sources = {t: TaskSource(world, t, split) for t in tasks}
    samples = [sources[tasks[i % len(tasks)]][i] for i in range(n)]
    return render_preview(samples, out)
