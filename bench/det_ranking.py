"""Are detection and REC limited by the boxes or by their scores?

Runs a model's ``<det>`` expert on the ``shapes`` suite's det and REC questions (test split, the eval seed) and
scores the same slots twice: ranked by the model's own scores (what ``taskmllm eval`` reports), and ranked by an
oracle that scores each slot by its best IoU with the ground truth. The oracle keeps every box where it is, so the
gap between the two is what better scores alone could gain; the oracle number is what the boxes allow.
Also reports how much the scores vary within a question (a score head stuck at its prior varies by ~0).

    python bench/det_ranking.py --model tiny --n 100 --out bench/results/det_ranking_tiny.json   (~30 s)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


@dataclass
class _Result:
    text: str
    calls: list


def oracle_scored(result: Any, gt: np.ndarray) -> _Result:
    """``result`` with each ``det`` call's slots scored by their best IoU with ``gt`` (pixel xyxy)."""
    from taskmllm.eval.suites import _valid_boxes
    from taskmllm.experts.boxes import box_iou

    calls = []
    for call in result.calls:
        if call.task == "det" and call.boxes is not None:
            boxes = _valid_boxes(call.boxes)
            iou = np.zeros(len(boxes))
            if len(boxes) and len(gt):
                iou = box_iou(torch.tensor(boxes), torch.tensor(gt)).max(1).values.numpy()
            call = replace(call, scores=iou)
        calls.append(call)
    return _Result(result.text, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=100, help="questions per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from taskmllm.eval.suites import _first_call, _scale, answer_all, pipeline_answerer, score_task, shapes_items
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model)
    answer = pipeline_answerer(pipe)
    report: dict[str, Any] = {"model": args.model, "n": args.n}
    for task, key in (("det", "AP50"), ("rec", "acc@0.5")):
        items = shapes_items(task, args.n)
        results = answer_all(answer, [(it.visual, it.prompt) for it in items], desc=task)
        gts = [_scale(it.sample.targets[0].boxes, it.sample.hw) for it in items]
        own = score_task(task, items, results)
        oracle = score_task(task, items, [oracle_scored(r, g) for r, g in zip(results, gts)])
        spread = [float(np.std(c.scores)) for c in (_first_call(r, task) for r in results)
                  if c is not None and c.scores is not None and len(c.scores) > 1]
        report[task] = {f"{key}_model_scores": own[key], f"{key}_oracle_ranked": oracle[key],
                        "score_std_within_question": float(np.mean(spread)) if spread else None}
    emit(report, args.out)


if __name__ == "__main__":
    main()
