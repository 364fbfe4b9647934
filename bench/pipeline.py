"""Share of Pipeline latency spent in routing + experts, on the tiny recipe's model.

The tiny model is first fit for a few steps to answer with task tokens (so every expert really runs: an image
`<seg>`, an image `<det>` and a video `<track>`), then each request is timed end to end. Prints JSON with the
per-stage seconds and the routing + experts share; target <= 0.20.

    python bench/pipeline.py --out bench/results/pipeline.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

REQUESTS = [
    ("image", "Segment the red circle.", "Sure, <ref>the red circle</ref><seg>."),
    ("image", "Find all squares.", "<ref>squares</ref><det>."),
    ("video", "Track the blue heart.", "<ref>the blue heart</ref><track>."),
]


def fit_task_answers(steps: int):
    """A tiny-recipe JointModel that emits the requests' task tokens after ``steps`` AdamW steps."""
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.zoo import load_tiny_tokenizer, tiny_config
    from taskmllm.router.joint import JointModel

    torch.manual_seed(0)
    tok = load_tiny_tokenizer()
    joint = JointModel.build(TaskMLLM(tiny_config(tok), tok))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    visuals = [image if kind == "image" else [image] * 8 for kind, _, _ in REQUESTS]
    batch = joint.mllm.processor([q for _, q, _ in REQUESTS], visuals, answers=[a for _, _, a in REQUESTS])
    opt = torch.optim.AdamW(joint.mllm.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = joint.mllm(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return joint, visuals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from taskmllm.router.pipeline import Pipeline

    joint, visuals = fit_task_answers(args.steps)
    pipe = Pipeline(joint)
    runs = []
    for (kind, prompt, _), visual in zip(REQUESTS, visuals):
        pipe(visual, prompt, max_new_tokens=32)  # warm-up
        stages = {"preprocess": [], "generate": [], "experts": []}
        for _ in range(args.repeats):
            result = pipe(visual, prompt, max_new_tokens=32)
            for key in stages:
                stages[key].append(result.timings[key])
        median = {k: float(np.median(v)) for k, v in stages.items()}
        total = sum(median.values())
        runs.append({"request": prompt, "input": kind, "calls": [c.task for c in result.calls],
                     "seconds": {k: round(v, 4) for k, v in median.items()}, "total_s": round(total, 4),
                     "routing_experts_share": round(median["experts"] / total, 4)})
    report = {"device": "cpu", "threads": torch.get_num_threads(), "runs": runs,
              "max_routing_experts_share": max(r["routing_experts_share"] for r in runs), "target": 0.2}
    emit(report, args.out)


if __name__ == "__main__":
    main()
