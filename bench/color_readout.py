"""Where a model's colour answers fail: in what its LLM is given, or in how it looks the object up?

1. **Is the colour there?** A linear probe (multinomial logistic regression, standardized inputs) reads the colour
   of the object a colour question names from the tower's patch features and from the LLM's input visual tokens
   (the projector's), each averaged over the tokens weighted by how much of them the object covers; optionally
   from the LLM's hidden states at the visual tokens after ``--layers`` blocks (image-first models: those states
   do not depend on the question). Trained on ``--n`` train-world questions, scored on 400 of the ``val`` world.
2. **How is the object named?** ``--forms N``: the model's own greedy answers to N colour questions of ``--split``,
   accuracy by the form of the referring expression ("the POS SIZE X": position word, size, shape noun).

    python bench/color_readout.py --model smol --n 1200 --forms 200 --split test
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
import torch.nn.functional as F
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

from taskmllm.data.shapesworld import COLORS, SHAPES, WorldConfig, shapesworld_dataset
from taskmllm.data.shapesworld.referring import POSITIONS
from taskmllm.eval.suites import answer_all, pipeline_answerer, shapes_items
from taskmllm.model.processor import positions
from taskmllm.router.pipeline import Pipeline

SIZES = ("small", "medium", "large")


@torch.no_grad()
def named_object_features(mllm, split: str, n: int, seed: int, layers: list[int]
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per colour question, the cover-weighted mean of each feature kind over the named object, and its colour."""
    data = shapesworld_dataset({"color": 1.0}, n, seed=seed, split=split,
                               config=WorldConfig(image_size=mllm.config.vision.image_size))
    rows: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    colors: list[int] = []
    for start in range(0, n, 16):
        samples = [data[i] for i in range(start, min(n, start + 16))]
        batch = mllm.processor.conversations([s.turns[:1] for s in samples], [s.image for s in samples])
        feats, tokens = mllm.encode_images(batch.pixel_values)  # (B, N, C) on the tower grid, (B, N', H)
        kinds = {"tower": (mllm.vision.grid, feats), "tokens": (mllm.grid, tokens)}
        if layers:
            emb = mllm.embed(batch.input_ids, tokens, batch.input_ids)
            out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                           position_ids=positions(batch.attention_mask), use_cache=False, output_hidden_states=True)
            visual = batch.input_ids == mllm.image_id
            for layer in layers:
                states = out.hidden_states[layer]
                kinds[f"layer{layer}"] = (mllm.grid, states[visual].view(len(samples), -1, states.shape[-1]))
        for b, sample in enumerate(samples):
            obj = next(o for o in sample.objects if o.id == sample.grounding.objects[0])
            mask = torch.from_numpy(obj.frame_mask(0, sample.hw).astype(np.float32))[None, None]  # (1, 1, H, W)
            for kind, (grid, x) in kinds.items():
                cover = F.adaptive_avg_pool2d(mask, grid).flatten()  # (N,) share of each token the object covers
                rows[kind].append((cover[:, None] * x[b].float()).sum(0) / cover.sum().clamp_min(1e-6))
            colors.append(list(COLORS).index(obj.color))
    return {k: torch.stack(v) for k, v in rows.items()}, torch.tensor(colors)


def linear_readout(train: torch.Tensor, y: torch.Tensor, held: torch.Tensor, y_held: torch.Tensor,
                   steps: int = 400) -> dict[str, float]:
    """Train / held-out accuracy of a logistic regression (Adam, weight decay 1e-4) on standardized inputs."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    x, xh = (train - mu) / sd, (held - mu) / sd
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(COLORS))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        with torch.enable_grad():
            loss = F.cross_entropy(linear(x), y)
            opt.zero_grad()
            loss.backward()
        opt.step()
    with torch.no_grad():
        return {"train": round(float((linear(x).argmax(1) == y).float().mean()), 3),
                "held_out": round(float((linear(xh).argmax(1) == y_held).float().mean()), 3)}


def form_of(question: str) -> str:
    """``"What color is the POS SIZE X?"``: the referring expression with its words replaced by their kind."""
    words = []
    for word in question.rstrip("?").split():
        words.append("POS" if word in POSITIONS else "SIZE" if word in SIZES else
                     "X" if word in SHAPES else word)
    return " ".join(words) + "?"


def accuracy_by_form(pipe: Pipeline, n: int, split: str) -> dict[str, dict]:
    """The model's greedy colour answers to ``n`` questions, exact-match accuracy per referring form."""
    items = shapes_items("color", n, split=split)
    answers = answer_all(pipeline_answerer(pipe), [(it.visual, it.prompt) for it in items], 16, "color",
                         progress=False)
    by: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for item, answer in zip(items, answers):
        form = form_of(item.prompt.splitlines()[-1])
        by[form][0] += answer.text.strip() == item.reference
        by[form][1] += 1
    out = {form: {"correct": c, "n": t, "accuracy": round(c / t, 3)}
           for form, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])}
    forms = dict(out)
    for name, positional in (("positional", True), ("not_positional", False)):
        c, t = (sum(v[k] for f, v in forms.items() if ("POS" in f.split()) == positional) for k in ("correct", "n"))
        out[name] = {"correct": c, "n": t, "accuracy": round(c / max(t, 1), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol")
    parser.add_argument("--n", type=int, default=1200, help="train-world questions the linear probes fit")
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="also read the LLM's visual-token "
                        "states after these many blocks (a full LLM forward per question: slower)")
    parser.add_argument("--forms", type=int, default=0, help="colour questions the model answers (0: skip)")
    parser.add_argument("--split", default="test", help="the world of --forms' questions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    mllm = pipe.model.mllm.eval()
    train, y = named_object_features(mllm, "train", args.n, 1, args.layers)
    held, y_held = named_object_features(mllm, "val", 400, 2, args.layers)
    majority = float((y_held == y.mode().values).float().mean())
    report = {"model": args.model, "n_train": args.n, "n_held_out": 400, "majority": round(majority, 3),
              "readout": {kind: linear_readout(train[kind], y, held[kind], y_held) for kind in train}}
    if args.forms:
        report["answers_by_form"] = {"split": args.split, "n": args.forms,
                                     "forms": accuracy_by_form(pipe, args.forms, args.split)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
