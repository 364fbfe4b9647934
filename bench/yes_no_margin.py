"""Does a yes/no answer depend on the image? The margin log p("Yes.") - log p("No.") on ShapesWorld ``exist``
questions, by true answer and question kind, with the own image and with another question's.

A model that reads the image puts a clearly larger margin on the questions whose answer is yes than on those
whose answer is no; one that does not shows the same margin for both (its accuracy then comes from a bias).

    python bench/yes_no_margin.py --model smol --n 96 --out bench/results/yes_no_margin.json
"""

from __future__ import annotations

import argparse

import torch

from taskmllm.data.shapesworld import ConversationConfig, WorldConfig, shapesworld_dataset
from taskmllm.eval.reliance import answer_nll
from taskmllm.eval.suites import DEFAULT_EVAL_SEED
from taskmllm.router.pipeline import Pipeline
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def margins(mllm, samples, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` margins with each sample's own image and with the next sample's image (within a batch)."""
    own, other = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts, images = [s.turns[0][0] for s in chunk], [s.image for s in chunk]
        for out, vis in ((own, images), (other, images[1:] + images[:1])):
            yes = answer_nll(mllm, prompts, vis, ["Yes."] * len(chunk))
            no = answer_nll(mllm, prompts, vis, ["No."] * len(chunk))
            out.append(no - yes)
    return torch.cat(own), torch.cat(other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=96, help="exist questions (test world)")
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="the evaluation world")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mllm = Pipeline.from_pretrained(args.model).model.mllm.eval()
    world = WorldConfig(image_size=mllm.config.vision.image_size)
    data = shapesworld_dataset({"exist": 1.0}, args.n, seed=args.seed, split="test", config=world,
                               conversation=ConversationConfig(question_first=None))
    samples = [data[i] for i in range(args.n)]
    own, other = margins(mllm, samples)
    yes = torch.tensor([s.turns[0][1] == "Yes." for s in samples])
    pair = torch.tensor([len(s.turns[0][0].split()) > 7 for s in samples])  # "a red circle" vs "a circle"
    report = {"model": str(args.model), "n": args.n, "accuracy": float(((own > 0) == yes).float().mean()),
              "predicted_yes": float((own > 0).float().mean()), "kinds": {}}
    for kind, keep in (("color+shape", pair), ("shape", ~pair)):
        row = {"n": int(keep.sum())}
        for label, sel in (("yes", keep & yes), ("no", keep & ~yes)):
            row[f"margin_{label}"] = float(own[sel].mean()) if sel.any() else None
            row[f"margin_{label}_other_image"] = float(other[sel].mean()) if sel.any() else None
        report["kinds"][kind] = row
    emit(report, args.out)


if __name__ == "__main__":
    main()
