"""Token positions a training stage computes: its micro-batches padded as one batch, with images and videos
apart, and with images, text-only samples and videos apart (what ``training/data_loader.Collate`` does now).

On a CPU the LLM's cost is about rows x padded length, so the ratio is the compute the grouping saves; the
real (unpadded) tokens are the floor. The stage's own data, batch size and the shipped model's processor; no
forward runs.

    python bench/padding.py --recipe smol --stage see --batches 100
"""

from __future__ import annotations

import argparse

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

from taskmllm.router.pipeline import Pipeline
from taskmllm.training.config import load_config
from taskmllm.training.data_loader import Collate
from taskmllm.training.recipe_run import RECIPES
from taskmllm.training.train import build_dataset


def positions(micro) -> tuple[int, int]:
    """``(rows x padded length, real tokens)`` summed over a :class:`MicroBatch`'s groups."""
    return (sum(g.batch.input_ids.numel() for g in micro.groups),
            sum(int(g.batch.attention_mask.sum()) for g in micro.groups))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smol")
    parser.add_argument("--stage", default="see")
    parser.add_argument("--batches", type=int, default=100, help="micro-batches of the stage, from the first")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = load_config(RECIPES / args.recipe / f"{args.stage}.yaml", ["--out_dir=/tmp/bench_padding"])
    data, bs = build_dataset(cfg), cfg.data.batch_size
    processor = Pipeline.from_pretrained(args.recipe).model.mllm.processor
    apart, together = Collate(processor), Collate(processor, split=False)  # the loader's grouping; one batch
    totals = {"one_group": 0, "images_videos": 0, "images_text_videos": 0, "real": 0}
    with_text = 0
    for b in range(args.batches):
        items = [(i, data[b * bs + i]) for i in range(bs)]
        videos = [item for item in items if item[1].frames is not None]
        stills = [item for item in items if item[1].frames is None]  # images and text: one group before
        with_text += any(s.image is None for _, s in stills)
        one, real = positions(together(items))
        totals["one_group"] += one
        totals["real"] += real
        totals["images_videos"] += sum(positions(together(g))[0] for g in (stills, videos) if g)
        totals["images_text_videos"] += positions(apart(items))[0]
    base = totals["images_videos"]
    emit({"recipe": args.recipe, "stage": args.stage, "batch_size": bs, "batches": args.batches,
          "batches_with_text": with_text, "positions": totals,
          "ratio_to_images_videos": {k: round(v / base, 3) for k, v in totals.items()}}, args.out)


if __name__ == "__main__":
    main()
