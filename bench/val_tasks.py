"""Checkpoints side by side on the ``val`` split of ShapesWorld: VQA (exist / color / count), seg gIoU, REC
Acc@0.5, det AP50, track success AUC, routing, and POPE-random accuracy and yes-ratio (task ``pope``: ``n`` val
scenes, 1:1 yes:no) — what a recipe's ablations are chosen on (the test world stays unseen).
``shapes_items(task, n, split="val")`` + ``score_task``, greedy, the same questions for every checkpoint;
videos have the model's frame count at most (as ``taskmllm eval`` renders them: ``smol`` sees 4, not 8).

    python bench/val_tasks.py none=/tmp/runs/none/final fuller=/tmp/runs/fuller/final --n 100 \\
        --out bench/results/grad_calibration.json
"""

from __future__ import annotations

import argparse
import time

from _report import emit

from taskmllm.data.shapesworld import WorldConfig
from taskmllm.eval.hallucination import pope_metrics
from taskmllm.eval.suites import (answer_all, pipeline_answerer, pope_shapes_samples, score_task,
                                  shapes_items)
from taskmllm.router.pipeline import Pipeline

TASKS = ("exist", "color", "count", "seg", "rec", "det", "track")  # and "pope", "track_box", "temporal" when asked
HEADLINE = {"seg": "giou", "rec": "acc@0.5", "det": "AP50", "track": "success_auc", "track_box": "success_auc",
            "temporal": "r1@0.5"}


def evaluate(path: str, tasks: tuple[str, ...], n: int, batch_size: int) -> dict:
    """Headline score and routing per task of the checkpoint at ``path``, and the VQA mean."""
    pipe = Pipeline.from_pretrained(path)
    answer = pipeline_answerer(pipe)
    world = WorldConfig(num_frames=min(WorldConfig().num_frames, pipe.model.mllm.config.max_frames))
    row: dict = {}
    for task in tasks:
        if task == "pope":
            samples = pope_shapes_samples(n, world=world, split="val")["random"]
            pairs = [(s.image, s.turns[0][0]) for s in samples]
            answers = answer_all(answer, pairs, batch_size, "pope", progress=False)
            random = pope_metrics([r.text for r in answers], [s.meta["label"] for s in samples])
            row["pope"], row["pope_yes"] = round(float(random["accuracy"]), 4), round(float(random["yes_ratio"]), 4)
            continue
        items = shapes_items(task, n, world=world, split="val")
        metrics = score_task(task, items, answer_all(answer, [(it.visual, it.prompt) for it in items], batch_size,
                                                     task, progress=False))
        row[task] = round(float(metrics[HEADLINE.get(task, "accuracy")]), 4)
        row[f"{task}_routing"] = round(float(metrics["routing"]), 4)
    vqa = [row[t] for t in ("exist", "color", "count") if t in row]
    if vqa:
        row["vqa"] = round(sum(vqa) / len(vqa), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="name=path pairs")
    parser.add_argument("--n", type=int, default=100, help="questions per task")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"split": "val", "n_per_task": args.n, "results": {}}
    for pair in args.checkpoints:
        name, _, path = pair.partition("=")
        t0 = time.perf_counter()
        report["results"][name] = {"path": path, **evaluate(path, tuple(args.tasks.split(",")), args.n,
                                                            args.batch_size),
                                   "eval_s": round(time.perf_counter() - t0, 1)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
