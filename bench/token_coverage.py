"""How many objects can a grid of visual tokens show? The share of a world's objects that some token shows.

A token "shows" an object when that object covers the largest part of the token and at least ``cover`` of it
(the rule of the auxiliary losses' targets, ``taskmllm.training.aux_targets.label_maps``). An object no token shows is
a question the LLM can only answer from a mixture: on ShapesWorld at 192 px the recipe's 4 x 4 tokens (the 12 x 12
grid pooled 3 x 3) show about a quarter of the objects at half cover, so an existence question is often about an
object that is nowhere in the tokens. Pure geometry of the data: no model runs.

    python bench/token_coverage.py --n 500 --out bench/results/token_coverage.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def shown(samples, grid: tuple[int, int], cover: float) -> tuple[int, int]:
    """``(objects some token of grid shows, objects)`` over ``samples`` (first frame)."""
    hit = total = 0
    for s in samples:
        masks = [torch.from_numpy(o.frame_mask(0, s.hw).astype(np.float32)) for o in s.objects]
        if not masks:
            continue
        frac, which = F.adaptive_avg_pool2d(torch.stack(masks)[None], grid)[0].flatten(1).max(0)  # (h*w,) each
        hit += len(set(which[frac >= cover].tolist()))
        total += len(masks)
    return hit, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="scenes of the world")
    parser.add_argument("--split", default="val")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--grids", type=int, nargs="+", default=[4, 6, 12], help="tokens per side (12 / pool)")
    parser.add_argument("--covers", type=float, nargs="+", default=[0.2, 0.25, 0.5])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = shapesworld_dataset({"caption": 1.0}, args.n, seed=0, split=args.split,
                               config=WorldConfig(image_size=args.image_size))
    samples = [data[i] for i in range(args.n)]
    rows = []
    for side in args.grids:
        for cover in args.covers:
            hit, total = shown(samples, (side, side), cover)
            rows.append({"tokens": side * side, "grid": side, "cover": cover, "shown": round(hit / total, 3)})
            print(rows[-1], flush=True)
    emit({"split": args.split, "n": args.n, "image_size": args.image_size,
          "objects_per_scene": round(float(np.mean([len(s.objects) for s in samples])), 2), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
