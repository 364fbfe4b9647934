"""``taskmllm data preview``: a grid of ShapesWorld samples cycling through every conversation task."""

from __future__ import annotations

from taskmllm.data.preview import render_preview
from taskmllm.data.shapesworld.conversations import IMAGE_TASKS, VIDEO_TASKS
from taskmllm.data.shapesworld.source import TaskSource
from taskmllm.data.shapesworld.world import ShapesWorld
from taskmllm.errors import ConfigError
from taskmllm.model.io import check_output_file

#: The most samples one preview grid shows (20 x 20 cells, about 40 megapixels).
MAX_PREVIEW_SAMPLES = 400


def preview_main(n: int = 16, out: str = "grid.png", seed: int = 0, split: str = "train") -> str:
    """Render ``n`` ShapesWorld samples cycling through every task to ``out`` (the CLI's ``data preview``).

    Raises:
        ConfigError: ``n`` is not an integer in 1..:data:`MAX_PREVIEW_SAMPLES`, or ``out`` cannot be written (a
            directory, or under a file).
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PREVIEW_SAMPLES:
        raise ConfigError(f"data preview: n must be an integer in 1..{MAX_PREVIEW_SAMPLES}, got {n!r}")
    check_output_file(out, "data preview --out")
    world = ShapesWorld(seed=seed)
    tasks = IMAGE_TASKS + VIDEO_TASKS
    sources = {t: TaskSource(world, t, split) for t in tasks}
    samples = [sources[tasks[i % len(tasks)]][i] for i in range(n)]
    return render_preview(samples, out)
