"""What can the LLM's visual tokens tell? Per-token shape and color probes on frozen MobileNetV2 variants.

The shipped ``tiny`` captions barely depend on which objects are in the image. This probe asks whether the
tokens the LLM reads hold each object's shape and color at all: an MLP (2 layers, 256 wide) trained on cached
frozen features predicts the shape and the color of the object covering the largest part of each LLM token
(>= 25% of it), and the held-out accuracy on object tokens is reported per feature variant:

- ``s16_avg2``: the tiny recipe's input: ``features[:14]`` (stride 16, 96 ch, 12 x 12 at 192 px), avg-pooled 2 x 2;
- ``s16_max2``: the same, max-pooled;
- ``s16_avg2_rgb``: ``s16_avg2`` plus each token's mean and max-pooled RGB of the 32 x 32 pixels under it;
- ``s32``: the last block (1280 ch, stride 32: 6 x 6 at 192 px), unpooled;
- ``s16_s32``: ``s16_avg2`` and ``s32`` concatenated.

    python bench/token_probe.py --train 2000 --test 400 --steps 1500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.data.shapesworld.vocab import COLORS, SHAPES
from taskmllm.eval.suites import DEFAULT_EVAL_SEED
from taskmllm.model.packaged import load_mobilenet_v2_features
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VARIANTS = ("s16_avg2", "s16_max2", "s16_avg2_rgb", "s32", "s16_s32")


def labels(scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``(grid*grid,)`` shape and color ids (+1; 0 = background) of the object covering most of each token."""
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    color_ids = {c: i + 1 for i, c in enumerate(COLORS)}
    cover = torch.stack([torch.from_numpy(o.mask.astype(np.float32)) for o in scene.objects])  # (O, H, W)
    frac = F.adaptive_avg_pool2d(cover[None], grid)[0].flatten(1)  # (O, grid*grid)
    best, which = frac.max(0)
    sid = np.array([shape_ids[o.category] for o in scene.objects])[which.numpy()]
    cid = np.array([color_ids[o.color] for o in scene.objects])[which.numpy()]
    keep = best.numpy() >= 0.25
    return np.where(keep, sid, 0), np.where(keep, cid, 0)


@torch.no_grad()
def featurize(images: np.ndarray, blocks: nn.Module) -> dict[str, torch.Tensor]:
    """Every variant's ``(B, 36, C)`` token features of ``images (B, H, W, 3)`` uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    h = (x - MEAN) / STD
    s16 = blocks[:14](h)  # (B, 96, 12, 12)
    s32 = blocks[14:](s16)  # (B, 1280, 6, 6)
    avg2 = F.avg_pool2d(s16, 2)
    rgb = torch.cat([F.avg_pool2d(x, 32), F.max_pool2d(x, 32)], 1)  # (B, 6, 6, 6)
    tok = lambda t: t.flatten(2).transpose(1, 2)  # (B, C, 6, 6) -> (B, 36, C)
    return {"s16_avg2": tok(avg2), "s16_max2": tok(F.max_pool2d(s16, 2)),
            "s16_avg2_rgb": tok(torch.cat([avg2, rgb * 4], 1)), "s32": tok(s32), "s16_s32": tok(torch.cat([avg2, s32], 1))}


def dataset(n: int, seed: int, blocks: nn.Module, size: int):
    world = ShapesWorld(WorldConfig(image_size=size), seed=seed)
    scenes = [world.image(i) for i in range(n)]
    feats: dict[str, list] = {}
    for start in range(0, n, 64):
        chunk = scenes[start:start + 64]
        for k, v in featurize(np.stack([s.image for s in chunk]), blocks).items():
            feats.setdefault(k, []).append(v)
    shape, color = zip(*(labels(s, 6) for s in scenes))
    return {k: torch.cat(v) for k, v in feats.items()}, torch.from_numpy(np.stack(shape)), torch.from_numpy(np.stack(color))


def probe(x_tr, s_tr, c_tr, x_te, s_te, c_te, steps: int, lr: float) -> dict[str, float]:
    torch.manual_seed(0)
    mu, sd = x_tr.mean((0, 1)), x_tr.std((0, 1)) + 1e-6
    norm = lambda x: ((x - mu) / sd).flatten(0, 1)
    xtr, xte = norm(x_tr), norm(x_te)
    mlp = nn.Sequential(nn.Linear(xtr.shape[1], 256), nn.GELU(), nn.Linear(256, len(SHAPES) + len(COLORS) + 2))
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr)
    s, c = s_tr.flatten(), c_tr.flatten()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (1024,))
        out = mlp(xtr[idx])
        loss = F.cross_entropy(out[:, :len(SHAPES) + 1], s[idx]) + F.cross_entropy(out[:, len(SHAPES) + 1:], c[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = mlp(xte)
    s, c = s_te.flatten(), c_te.flatten()
    obj = s > 0
    return {"shape_acc": round(float((out[:, :len(SHAPES) + 1].argmax(1) == s)[obj].float().mean()), 3),
            "color_acc": round(float((out[:, len(SHAPES) + 1:].argmax(1) == c)[obj].float().mean()), 3),
            "object_tokens": int(obj.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torchvision.models import mobilenet_v2

    blocks = mobilenet_v2().features.eval()
    load_mobilenet_v2_features(blocks)
    t0 = time.perf_counter()
    tr, s_tr, c_tr = dataset(args.train, 0, blocks, args.size)
    te, s_te, c_te = dataset(args.test, DEFAULT_EVAL_SEED, blocks, args.size)
    rows = {}
    for v in args.variants:
        rows[v] = probe(tr[v], s_tr, c_tr, te[v], s_te, c_te, args.steps, args.lr)
        print(v, rows[v], flush=True)
    emit({"train": args.train, "test": args.test, "steps": args.steps, "variants": rows,
          "wall_s": round(time.perf_counter() - t0, 1)}, args.out)


if __name__ == "__main__":
    main()
