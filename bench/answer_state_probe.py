"""Is "the named object is present" in the answer position's state? A linear probe per LLM layer (issue #27).

``smol`` answers existence questions from a prior even when its colour answers read the image. This asks where the
information stops: the frozen pretrained LLM reads exist questions (image first, the recipe's layout) with visual
tokens of three kinds, and a logistic regression per layer on the state that predicts the first answer token
(the question's last token) is scored on held-out test-world questions:

- ``projected``: MobileNetV2 features through a projector trained for ``--words-first`` steps on the recipe's
  ``words`` + ``regress`` loss alone (no LLM forward), the tokens an ``align``/``see`` stage aims for;
- ``oracle``: each token the mean input embedding of " <color> <shape>" of the object covering it (else " none");
- ``other``: the projected tokens of another question's image (the control: what the question text alone gives).

High accuracy on ``projected`` and chance on ``other`` = the frozen LLM already computes presence and only the
read-out is missing; chance on both = the lookup itself is not done. Output: JSON (``--out``) and a table.

    python bench/answer_state_probe.py --n 1200 --held 300
"""

from __future__ import annotations

import argparse
import time

import torch

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from vqa_probe import CLASSES, aux_states, cached_batches, visual_inputs, word_tokens, words_first
from taskmllm.eval.suites import DEFAULT_EVAL_SEED
from taskmllm.model.processor import positions
from taskmllm.training.aux import AuxContext, WordLoss, WordOptions
from taskmllm.training.config import load_config
from taskmllm.training.recipe_run import RECIPES
from taskmllm.training.train import build_joint, word_vectors

KINDS = ("projected", "oracle", "other")


@torch.no_grad()
def answer_states(mllm, batches, kind: str, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(len(layers), n, H)`` states at each sample's answer position and ``(n,)`` 1 = "Yes." answers."""
    per_layer, ys = [[] for _ in layers], []
    for batch, feats, samples in batches:
        if kind == "oracle":
            tokens = word_tokens(mllm, samples)
        else:
            tokens = visual_inputs(mllm, feats.roll(1, 0) if kind == "other" else feats)
        emb = mllm.embed(batch.input_ids, tokens)
        out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask), use_cache=False, output_hidden_states=True)
        at = aux_states(mllm, batch, feats, samples, out.hidden_states).answer_positions()
        rows = torch.arange(len(samples))
        for i, layer in enumerate(layers):
            per_layer[i].append(out.hidden_states[layer][rows, at].float())  # (B, H)
        ys.append(torch.tensor([float(s.turns[0][1] == "Yes.") for s in samples]))
    return torch.stack([torch.cat(x) for x in per_layer]), torch.cat(ys)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor,
                   weight_decay: float = 1e-2, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularized logistic regression fitted on standardized ``x (n, H)``."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x, x_held = (x - mean) / std, (x_held - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((linear(x_held).squeeze(-1) > 0).float() == y_held).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1200, help="training exist questions (train world)")
    parser.add_argument("--held", type=int, default=300, help="held-out exist questions (test world)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4, 8, 12, 16, 20, 24, 30])
    parser.add_argument("--words-first", type=int, default=2000, help="projector steps on words + regress")
    parser.add_argument("--lr", type=float, default=1e-3, help="the projector's learning rate")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(RECIPES / "smol" / "align.yaml", ["--out_dir=/tmp/answer_state_probe"])
    mllm = build_joint(cfg).mllm.eval()
    for p in mllm.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    train = cached_batches(mllm, ["exist"], args.n, "train", 0, "tower", True, batch_size=8)
    held = cached_batches(mllm, ["exist"], args.held, "test", DEFAULT_EVAL_SEED, "tower", True, batch_size=8)
    context = AuxContext(mllm.hidden_size, mllm.vision.width, len(mllm.llm.get_decoder().layers), CLASSES,
                         word_vectors=lambda phrases: word_vectors(mllm, phrases))
    words = WordLoss(WordOptions(labels=list(CLASSES), regress=1.0), context)
    for p in mllm.projector.parameters():
        p.requires_grad_(True)
    words_first(mllm, words, train, args.words_first, args.lr)
    rows = {}
    for kind in KINDS:
        x, y = answer_states(mllm, train, kind, args.layers)
        x_held, y_held = answer_states(mllm, held, kind, args.layers)
        rows[kind] = {layer: round(probe_accuracy(x[i], y, x_held[i], y_held), 3)
                      for i, layer in enumerate(args.layers)}
        print(kind, rows[kind], flush=True)
    emit({"n": args.n, "held": args.held, "words_first": args.words_first,
          "yes_share_held": round(float(y_held.mean()), 3), "accuracy_by_layer": rows, "wall_s": round(time.perf_counter() - t0, 1)}, args.out)


if __name__ == "__main__":
    main()
