"""Does the model read the image? Answer NLL with the own image vs. another scene's, per VQA task.

For each ShapesWorld question task, ``n`` test-world questions are scored teacher-forced twice — with their own
image and with another question's image (:func:`taskmllm.eval.reliance.image_reliance`). The ``gap`` (nats per
answer) is 0 for a model that ignores its visual tokens, whatever its accuracy; a VQA accuracy at chance with a
gap near 0 says the LLM never learned to look, not that the vision features are poor.

    python bench/image_reliance.py --model tiny --n 128 --out bench/results/image_reliance.json
"""

from __future__ import annotations

import argparse

import torch

from taskmllm.eval.reliance import RELIANCE_TASKS, reliance_by_task
from taskmllm.router.pipeline import Pipeline
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=128, help="questions per task")
    parser.add_argument("--tasks", nargs="+", default=list(RELIANCE_TASKS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    mllm = Pipeline.from_pretrained(args.model).model.mllm
    per_task = reliance_by_task(mllm, args.tasks, args.n)
    emit({"model": str(args.model), "n": args.n, "tasks": per_task}, args.out)


if __name__ == "__main__":
    main()
