"""Which loss weighting lets the segmentation expert learn ShapesWorld's small masks?

A model's MLLM is frozen; for ShapesWorld referring-segmentation samples (train split, and the held-out eval
seed) its vision features and ``<seg>`` query states are cached once, then a FRESH copy of the model's seg
expert (the same initial weights for every arm) trains on them under each loss weighting, same batches, same
steps. Reports held-out gIoU (:func:`taskmllm.eval.grounding.referring_segmentation`, masks at the world's
size) against the step count.

ShapesWorld objects cover ~2% of the image; with LISA's ``2 BCE + 0.5 Dice`` the per-pixel BCE pays most for
the background and the masks shrink towards empty (the session-7 ``smol`` predicted empty masks on every test
question). Measured on the tiny recipe's assign checkpoint (400 steps, batch 16): LISA 0.16, ``dice 2`` 0.25,
``bce 0.5 + dice 2`` 0.29 (1,200 steps: dice only 0.31, bce 0.2 + dice 2 0.28-0.31; it plateaus by 300).

    python bench/seg_loss_probe.py --model runs/tiny/assign/final --steps 400 --out bench/results/seg_loss.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from taskmllm.router.dispatch import run_calls

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

ARMS = {"lisa": {"bce_weight": 2.0, "dice_weight": 0.5}, "dice2": {"bce_weight": 2.0, "dice_weight": 2.0},
        "bce0.5_dice2": {"bce_weight": 0.5, "dice_weight": 2.0}}


def cache(joint, n: int, seed: int, split: str, world, batch_size: int = 16) -> list:
    """``[(seg calls, vision features, batch, targets)]`` of ``n`` samples, the MLLM run once (frozen)."""
    from taskmllm.data.shapesworld import shapesworld_dataset

    data = shapesworld_dataset({"seg": 1.0}, n, seed=seed, split=split, config=world)
    out = []
    for start in range(0, n, batch_size):
        samples = [data[i] for i in range(start, min(n, start + batch_size))]
        batch = joint.mllm.processor.conversations([s.turns for s in samples], [s.image for s in samples])
        with torch.no_grad():
            mllm_out = joint.mllm(batch, "none")
            calls = joint.router.route(batch.input_ids, mllm_out.hidden_states, batch.attention_mask)
        calls = [c for c in calls if c.task == "seg"]
        out.append((calls, mllm_out.expert_inputs, batch, [samples[c.sample].targets[0] for c in calls]))
    return out


def held_out_giou(joint, held: list) -> float:
    from taskmllm.eval.grounding import referring_segmentation

    preds, targets = [], []
    with torch.no_grad():
        for calls, feats, batch, tgts in held:
            outputs = run_calls(joint.experts, calls, feats)[0].outputs
            sizes = [t.mask.shape for t in tgts]
            preds += [r.mask for r in joint.experts["seg"].postprocess(outputs, sizes)]
            targets += [t.mask for t in tgts]
    return referring_segmentation(preds, targets)["giou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny/assign/final", help="a JointModel directory or shipped name")
    parser.add_argument("--arms", type=json.loads, default=ARMS, help="JSON {name: seg options}")
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--val", type=int, default=192)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from taskmllm.data.shapesworld import WorldConfig
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(args.model).eval()
    cfg = joint.mllm.config
    world = WorldConfig(image_size=cfg.vision.image_size, num_frames=cfg.max_frames)
    t0 = time.perf_counter()
    train, held = cache(joint, args.train, 0, "train", world), cache(joint, args.val, DEFAULT_EVAL_SEED, "test", world)
    report = {"model": args.model, "cache_s": round(time.perf_counter() - t0, 1), "steps": args.steps, "arms": {}}
    base = copy.deepcopy(joint.experts["seg"].state_dict())
    for name, options in args.arms.items():
        joint.set_expert_options({"seg": options})
        expert = joint.experts["seg"]
        expert.load_state_dict(base)
        torch.manual_seed(0)
        opt = torch.optim.AdamW(expert.parameters(), lr=args.lr, weight_decay=0.02)
        curve, t0 = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            calls, feats, batch, targets = train[(step - 1) % len(train)]
            expert.train()
            outputs = run_calls(joint.experts, calls, feats)[0].outputs
            loss = sum(expert.loss(outputs, targets).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
            opt.step()
            if step % args.every == 0 or step == args.steps:
                expert.eval()
                curve.append({"step": step, "giou": round(held_out_giou(joint, held), 4)})
                print(name, curve[-1], flush=True)
        report["arms"][name] = {"options": options, "curve": curve, "wall_s": round(time.perf_counter() - t0, 1)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
