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
from taskmllm.training.recipe_run import RECIPES
from taskmllm.training.train import build_dataset


def positions(processor, groups) -> tuple[int, int]:
    """``(rows x padded length, real tokens)`` summed over the non-empty ``groups`` of samples."""
    computed = real = 0
    for group in (g for g in groups if g):
        batch = processor.conversations([s.turns for s in group],
                                        [s.frames if s.frames is not None else s.image for s in group])
        computed += batch.input_ids.numel()
        real += int(batch.attention_mask.sum())
    return computed, real


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
    totals = {"one_group": 0, "images_videos": 0, "images_text_videos": 0, "real": 0}
    with_text = 0
    for b in range(args.batches):
        samples = [data[b * bs + i] for i in range(bs)]
        videos = [s for s in samples if s.frames is not None]
        images = [s for s in samples if s.frames is None and s.image is not None]
        text = [s for s in samples if s.frames is None and s.image is None]
        with_text += bool(text)
        one, real = positions(processor, [samples])
        totals["one_group"] += one
        totals["real"] += real
        totals["images_videos"] += positions(processor, [images + text, videos])[0]
        totals["images_text_videos"] += positions(processor, [images, text, videos])[0]
    base = totals["images_videos"]
    emit({"recipe": args.recipe, "stage": args.stage, "batch_size": bs, "batches": args.batches,
          "batches_with_text": with_text, "positions": totals,
          "ratio_to_images_videos": {k: round(v / base, 3) for k, v in totals.items()}}, args.out)


if __name__ == "__main__":
    main()
