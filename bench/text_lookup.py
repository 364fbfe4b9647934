"""Can the LLM answer a ShapesWorld question when the scene is given as *text*? An upper bound on the lookup
itself: no vision, no projector — each object written out as words ("a small red triangle at the top left"),
ordered left to right, then the test question as it is asked of the image.

The untouched SmolLM2 (``--model base``) measures the pretrained LLM's own skill at finding the named object
in a list and reading its attribute; a trained model (``--model smol`` or a directory) whether its training
taught that lookup beyond images. ``--shots K`` puts K solved examples of the same task (train world) before
each question as earlier chat turns, so the answer format is known. Scored as the shapes suite scores VQA
(exact match after ``normalize_answer``), split into questions that name the object by position ("the
leftmost ...") and the others.

    python bench/text_lookup.py --model base --tasks color --n 200 --shots 3
"""

from __future__ import annotations

import argparse
import collections

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from color_readout import form_of  # bench/color_readout.py: a question's referring form ("the POS SIZE X")

from taskmllm.data.shapesworld import WorldConfig
from taskmllm.eval.suites import shapes_items
from taskmllm.eval.vqa import normalize_answer
from taskmllm.router.pipeline import Pipeline

INSTRUCTION = "Answer in one or two words."


def place(obj, hw: tuple[int, int]) -> str:
    """``"top left"`` … ``"bottom right"``: the thirds of the image the object's box centre falls in."""
    x0, y0, x1, y1 = (float(v) for v in obj.box)
    h, w = hw
    row = ("top", "middle", "bottom")[min(2, int(3 * (y0 + y1) / 2 / h))]
    col = ("left", "center", "right")[min(2, int(3 * (x0 + x1) / 2 / w))]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def describe(sample) -> str:
    """The scene as text: every object as size, colour, shape and place, left to right."""
    objs = sorted(sample.objects, key=lambda o: float(o.box[0] + o.box[2]))
    parts = [f"a {o.size} {o.color} {o.category} at the {place(o, sample.hw)}" for o in objs]
    return "The image shows, from left to right: " + "; ".join(parts) + "."


def message(item) -> str:
    """The user turn: the scene as text, the item's question (its image placeholder dropped), the instruction."""
    question = item.prompt.replace("<image>", "").strip()
    return f"{describe(item.sample)}\n{question} {INSTRUCTION}"


def load(name: str) -> Pipeline:
    """``base``: the untouched SmolLM2 in a fresh smol model (text-only use); else a shipped name or directory."""
    if name != "base":
        return Pipeline.from_pretrained(name)
    from taskmllm.router.joint import JointModel
    from taskmllm.zoo import build_smol

    return Pipeline(JointModel.build(build_smol()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="base (the untouched SmolLM2), smol, or a directory")
    parser.add_argument("--tasks", nargs="+", default=["color"], help="VQA tasks of the shapes suite")
    parser.add_argument("--n", type=int, default=200, help="questions per task")
    parser.add_argument("--shots", type=int, default=3, help="solved train-world examples before each question")
    parser.add_argument("--split", default="val", help="the world the questions come from")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per batched generation")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args()

    pipe = load(args.model)
    world = WorldConfig(image_size=pipe.model.mllm.config.vision.image_size)
    report: dict = {"model": args.model, "shots": args.shots, "split": args.split, "tasks": {}}
    for task in args.tasks:
        items = shapes_items(task, args.n, world=world, split=args.split)
        shots = shapes_items(task, args.shots, world=world, split="train") if args.shots else []
        history = []
        for ex in shots:
            history += [("user", message(ex)), ("assistant", ex.reference)]
        right, total, examples = collections.Counter(), collections.Counter(), []
        answers = []
        for start in range(0, len(items), args.batch_size):  # one batched generation per chunk
            chunk = items[start:start + args.batch_size]
            results = pipe.chat_batch([None] * len(chunk), [[*history, ("user", message(it))] for it in chunk],
                                      max_new_tokens=12)
            answers += [r.text for r in results]
        for item, answer in zip(items, answers):
            ok = normalize_answer(answer) == normalize_answer(item.reference)
            form = "positional" if "POS" in form_of(item.prompt).split() else "other"
            right[form] += ok
            total[form] += 1
            if len(examples) < 4:
                examples.append({"text": message(item), "answer": answer, "reference": item.reference})
        report["tasks"][task] = {
            "accuracy": sum(right.values()) / len(items),
            "by_form": {f: {"accuracy": right[f] / total[f], "n": total[f]} for f in sorted(total)},
            "examples": examples}
    emit(report, args.out)


if __name__ == "__main__":
    main()
