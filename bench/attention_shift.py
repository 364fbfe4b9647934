"""How much attention each calibrated intervention moves onto the image, on unseen ShapesWorld prompts (JSON).

For each method with the model's calibrated settings (``interventions.json``) and ``--n`` scenes of the ``test``
split of the evaluation world: one POPE question and the caption prompt per scene. For each prompt, the answer's
attention to the visual tokens (:func:`~taskmllm.model.interventions.attention_map.compare_attention_maps`: the
rows that predict the answer, each run's own greedy answer) with and without the intervention, summed over the
visual tokens and averaged over (a) the heads the intervention acted on in its run and (b) every head. Reported per
method and prompt kind: the mean image-attention share with and without, and the mean number of heads acted on
per sample. It is the "attention moved" column of the hallucination analysis (README, "Hallucination").

    python bench/attention_shift.py --model smol --n 16 --out bench/results/attention_shift_smol.json
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def image_share(maps) -> float:
    """Mean over samples of the summed attention on the visual tokens (samples without a map are skipped)."""
    return float(np.mean([m.sum() for m in maps.maps if m is not None])) if any(
        m is not None for m in maps.maps) else float("nan")


def heads_per_sample(maps) -> float:
    """Mean over samples of the number of (layer, head) pairs averaged."""
    return float(sum(h.sum(-1).float() for h in maps.heads.values()).mean()) if maps.heads else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=16, help="test scenes (one POPE question and one caption each)")
    parser.add_argument("--methods", nargs="+", default=["var", "vhr", "zerotuning"])
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens whose predicting rows are averaged")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from taskmllm.data.shapesworld import WorldConfig
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED, pope_shapes_samples, shapes_items
    from taskmllm.model.interventions import attention_maps, compare_attention_maps
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model)
    mllm = pipe.model.mllm
    world = WorldConfig(num_frames=min(WorldConfig().num_frames, mllm.config.max_frames))
    pope = pope_shapes_samples(args.n, DEFAULT_EVAL_SEED, world)["adversarial"]
    first = {}
    for s in pope:  # one question per scene
        first.setdefault(s.meta["index"], s)
    prompts = {"pope": [(s.image, s.turns[0][0]) for s in first.values()][:args.n],
               "caption": [(it.visual, it.prompt) for it in shapes_items("caption", args.n, DEFAULT_EVAL_SEED, world)]}
    report = {"model": str(args.model), "n": args.n, "tokens": args.tokens, "split": "test", "methods": {}}
    for name in args.methods:
        hook = pipe.intervention(name)
        rows = {}
        for kind, items in prompts.items():
            batch = pipe.processor([p for _, p in items], [v for v, _ in items])
            with_sel, without_sel = compare_attention_maps(mllm, batch, hook, max_new_tokens=args.tokens)
            # every head, over the same answers (teacher-forced again, not generated again)
            with_all = attention_maps(mllm, batch, hook, answers=with_sel.answers)
            without_all = attention_maps(mllm, batch, None, answers=without_sel.answers)
            rows[kind] = {"heads_acted_on": round(heads_per_sample(with_sel), 1),
                          "image_share_selected": {"with": image_share(with_sel), "without": image_share(without_sel)},
                          "image_share_all_heads": {"with": image_share(with_all), "without": image_share(without_all)}}
        report["methods"][name] = {"settings_source": pipe.intervention_source(name) or "–",
                                   "intervention": type(hook).__name__, "settings": {
                                       k: f"{len(v)} heads" if k == "heads" and v else v
                                       for k, v in hook.settings().items()}, **rows}
    emit(report, args.out)


if __name__ == "__main__":
    main()
