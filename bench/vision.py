"""How fast a MobileNetV2 tower turns frames into features: torchvision's own forward vs the tower's.

``MobileNetV2Tower`` (``taskmllm/model/vision.py``) folds each BatchNorm into its convolution and runs
channels-last (frozen: each pair and its ReLU6 as one oneDNN convolution, the frames in cache-sized chunks); this
times it against torchvision's modules (``tower.features``, NCHW, a BatchNorm pass per
convolution) on the same weights and frames, frozen (no gradient: every stage of the tiny recipe, and inference)
and training (forward + backward into the tower's parameters), with the largest difference of the features.
Frames/s, best of ``--repeats`` calls after one warm-up.

    python bench/vision.py --threads 2 --frames 36 --image-size 192 --feature-layer 13
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _bandwidth import machine
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

from taskmllm.model.weight_layout import best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=36, help="frames per call (a tiny recipe step: ~36)")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--feature-layer", type=int, default=13, help="the tower's last block (tiny: 13)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from taskmllm.model.config import VisionConfig
    from taskmllm.model.packaged import MOBILENET_V2, is_installed, load_mobilenet_v2_features
    from taskmllm.model.vision import MobileNetV2Tower

    tower = MobileNetV2Tower(VisionConfig(kind="mobilenet_v2", feature_layer=args.feature_layer,
                                          image_size=args.image_size))
    if is_installed(MOBILENET_V2):
        load_mobilenet_v2_features(tower.features)
    x = torch.rand(args.frames, 3, args.image_size, args.image_size)
    ways = {"torchvision": lambda: tower.features(x).flatten(2).transpose(1, 2), "tower": lambda: tower(x)}

    def trained(forward):
        tower.zero_grad()
        forward().square().mean().backward()

    with torch.no_grad():
        want = ways["torchvision"]()
        diff = (ways["tower"]() - want).abs().max().item()
        frozen = {k: best_seconds(fn, args.repeats) for k, fn in ways.items()}
    tower.train()
    training = {k: best_seconds(lambda: trained(fn), args.repeats) for k, fn in ways.items()}
    report = {**machine(), "frames": args.frames, "image_size": args.image_size,
              "feature_layer": args.feature_layer, "imagenet_weights": is_installed(MOBILENET_V2),
              "max_abs_diff": float(f"{diff:.2g}"), "feature_max_abs": round(want.abs().max().item(), 3)}
    for name, times in (("frozen", frozen), ("training", training)):
        report[name] = {**{k: {"ms": round(t * 1e3, 1), "frames_per_s": round(args.frames / t, 1)}
                           for k, t in times.items()},
                        "speedup": round(times["torchvision"] / times["tower"], 2)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
