"""Data-engine throughput: ShapesWorld conversation samples per second on one core, as JSON.

Usage: ``python bench/data.py [--seconds 5] [--size 128] [--frames 8]``. Image samples cycle through every
image task (scene generation + conversation + targets); video samples through every video task.
Targets (issue #29): >= 1,000 image and >= 500 video samples/s on one core; on a shared machine the rate per CPU
second of this process (``per_cpu_s``) is what one dedicated core delivers, and it is what the targets are read on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from taskmllm.data.shapesworld.conversations import IMAGE_TASKS, VIDEO_TASKS
from taskmllm.data.shapesworld import TaskSource
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig


def rate(sources: list[TaskSource], seconds: float, rounds: int) -> dict[str, float]:
    """Samples/s drawing round-robin from ``sources`` over ``rounds`` rounds of ``seconds / rounds`` each.

    Reports the best and the median round (wall clock) and the rate per CPU second of this process: on a
    shared machine the best round and the CPU rate are what one dedicated core delivers.
    """
    n, rates = 0, []
    cpu0 = time.process_time()
    for _ in range(rounds):
        k, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            sources[(n + k) % len(sources)][n + k]
            k += 1
        rates.append(k / (time.perf_counter() - start))
        n += k
    return {"best": round(max(rates), 1), "median": round(statistics.median(rates), 1),
            "per_cpu_s": round(n / (time.process_time() - cpu0), 1), "samples": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = ShapesWorld(WorldConfig(image_size=args.size, num_frames=args.frames), seed=0)
    _ = world.backgrounds.photos  # load the photos once, outside the timing
    image = rate([TaskSource(world, t) for t in IMAGE_TASKS], args.seconds, args.rounds)
    video = rate([TaskSource(world, t) for t in VIDEO_TASKS], args.seconds, args.rounds)
    print(json.dumps({
        "bench": "data", "image_size": args.size, "num_frames": args.frames,
        "image_samples_per_s": image["best"], "video_samples_per_s": video["best"],
        "image": image, "video": video,
        "targets_per_cpu_s": {"image": 1000, "video": 500},
        "meets_targets": image["per_cpu_s"] >= 1000 and video["per_cpu_s"] >= 500,
        "cores_used": 1, "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
