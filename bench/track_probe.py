"""Where does referring tracking fail: in the ``<track>`` query states or in the tracking expert?

The tracking counterpart of ``bench/seg_probe.py``. A trained model's MLLM is frozen; for ShapesWorld tracking
samples ("track the ...", the target named by a phrase; train split and the held-out eval seed) the frozen vision
features of every frame, the LLM's visual-token states and the ``<track>`` query states the MLLM computes on the
teacher-forced answer are cached once, then a FRESH tracking expert trains on them from three query sources,
same batches, same steps: ``llm`` (the model's query states), ``oracle`` (a learned bag-of-words encoding of the
``<ref>`` phrase) and ``none`` (one learned constant: the floor of "follow the salient object"). Reports held-out
success AUC (:func:`taskmllm.eval.tracking.tracking_metrics`, OPE) and first-frame IoU against the step count.
``--options`` gives the fresh expert other options (``'{"llm_context": true}'``).

    python bench/track_probe.py --model smol --cache /tmp/track_probe_smol
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from expert_probe import normalize_queries  # the REC probe's parts
from seg_probe import cache_calls, cached, probe_parser, train_probe  # the seg probe's cache, command line and loop


def cache(joint, samples, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``bench/seg_probe.py``'s :func:`cache_calls` of referring-tracking samples, with ``boxes (N, T, 4)``
    normalized xyxy (invisible rows 0) and ``visible (N, T)``."""
    return cache_calls(joint, samples, "track", lambda t: {
        "boxes": torch.as_tensor(np.nan_to_num(np.asarray(t.boxes, np.float32))),
        "visible": torch.as_tensor(np.asarray(t.visible, bool))}, batch_size)


def evaluate(expert, data: dict, queries: torch.Tensor, vf) -> dict[str, float]:
    """Held-out OPE success AUC and mean IoU of the expert's boxes (visible frames), and first-frame IoU."""
    from taskmllm.eval.tracking import tracking_metrics
    from taskmllm.experts.boxes import elementwise_box_iou

    with torch.no_grad():
        boxes = torch.cat([expert(queries[s:s + 64], vf(data, slice(s, s + 64))).boxes.float().clamp(0, 1)
                           for s in range(0, len(queries), 64)])  # (N, T, 4)
    gt = data["boxes"].clone()
    gt[~data["visible"]] = float("nan")
    size = 100.0  # normalized boxes in a 100-px frame: the AUC does not depend on the scale
    m = tracking_metrics(list((boxes * size).numpy()), list((gt * size).numpy()), list(data["visible"].numpy()))
    first = data["visible"][:, 0]
    iou0 = elementwise_box_iou(boxes[first, 0], data["boxes"][first, 0])
    return {"auc": round(float(m["success_auc"]), 4), "mean_iou": round(float(m["mean_iou"]), 4),
            "first_frame_iou": round(float(iou0.mean()), 4)}


def track_target(d: dict, i: int):
    """Sample ``i``'s TaskTarget: its per-frame boxes and visibility."""
    from taskmllm.experts.base import TaskTarget

    return TaskTarget("track", boxes=d["boxes"][i].numpy(), visible=d["visible"][i].numpy())


def main() -> None:
    parser = probe_parser(__doc__, "track", train=1500, val=200, steps=1200, lr=6e-4, batch=16)
    args = parser.parse_args()

    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED
    from taskmllm.experts.base import VisionFeatures
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(args.model).eval()
    world = WorldConfig(image_size=joint.mllm.config.vision.image_size, num_frames=joint.mllm.config.max_frames)
    start = time.perf_counter()
    train_ds = shapesworld_dataset({"track": 1.0}, length=args.train, seed=0, config=world)
    val_ds = shapesworld_dataset({"track": 1.0}, length=args.val, seed=DEFAULT_EVAL_SEED, split="val", config=world)
    data = cached(args.cache, "track_train", f"{args.model}:{args.train}",
                  lambda: cache(joint, [train_ds[i] for i in range(args.train)]))
    val = cached(args.cache, "track_val", f"{args.model}:{args.val}",
                 lambda: cache(joint, [val_ds[i] for i in range(args.val)]))
    cache_s = time.perf_counter() - start
    grid, size, context_grid = joint.mllm.vision.grid, joint.mllm.config.vision.image_size, joint.mllm.grid

    def vf(d: dict, rows) -> VisionFeatures:  # the expert's inputs for some rows of a cached set
        return VisionFeatures(d["features"][rows], grid, size, d["context"][rows], context_grid)

    shipped_expert = joint.experts["track"].eval()
    shipped = evaluate(shipped_expert, val, val["queries"], vf)
    spec = shipped_expert.spec
    options = dict(spec.options) if args.options is None else args.options
    data["queries"], val["queries"] = normalize_queries(args.query_norm, data["queries"], val["queries"])
    results = {source: train_probe(source, joint, spec, data, val, vf, args.steps, args.lr, args.batch, options,
                                   track_target, evaluate, task="track") for source in args.sources}
    emit({"model": str(args.model), "train": len(data["boxes"]), "val": len(val["boxes"]), "steps": args.steps,
          "lr": args.lr, "batch": args.batch, "options": options, "query_norm": args.query_norm,
          "cache_s": round(cache_s, 1), "shipped_expert_on_llm_queries": shipped, "probes": results}, args.out)


if __name__ == "__main__":
    main()
