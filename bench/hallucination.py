"""Hallucination benchmark: POPE and CHAIR on unseen ShapesWorld worlds with no intervention, VAR, VHR and
ZeroTuning — each with the model's calibrated settings (``interventions.json``, ``taskmllm calibrate``; the
method's defaults when the model carries none) — plus each method's generation overhead at batch 1 and 8.

For each of ``--seeds`` evaluation worlds (seeds ``DEFAULT_EVAL_SEED + i``, ``test`` split: scenes never drawn in
training nor in calibration, which uses the ``val`` split) and ``--n`` images each: POPE random / popular /
adversarial (accuracy, F1, yes-ratio) and CHAIR of one caption per image (CHAIR_S, CHAIR_I, recall, mean caption
length) — the questions and scoring of ``taskmllm eval --suite pope-shapes`` / ``chair-shapes``. Reported: mean ±
population std over worlds, and per method the paired bootstrap 95% interval of its difference from ``none``
(:mod:`taskmllm.eval.paired`: images resampled within each world, the same images for both methods), and the
issue's target (CHAIR_S down >= 15% relative, recall down <= 0.02, POPE-adversarial accuracy not lower, the
CHAIR_S interval excluding zero). A method whose settings are the identity (uncalibrated ZeroTuning, a calibration
that found nothing) is not run: its answers are the plain model's (identity settings are bit-identical, tested).

    python bench/hallucination.py --model tiny --n 200 --seeds 3 --out bench/results/hallucination_tiny.json \
        --md bench/results/hallucination_tiny.md
    python bench/hallucination.py --model tiny --n 10 --seeds 1 --bootstrap 200   # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from tqdm.auto import tqdm
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from _timing import time_configs

SPLITS = ("random", "popular", "adversarial")
QUALITY = [(f"{s}_{m}", f"{s[:3]} {m.replace('yes_ratio', 'yes').replace('accuracy', 'acc')}")
           for s in SPLITS for m in ("accuracy", "f1", "yes_ratio")] + \
    [("chair_s", "CHAIR_S ↓"), ("chair_i", "CHAIR_I ↓"), ("recall", "recall"), ("mean_length", "length")]
DIFFS = ("adversarial_accuracy", "mean_accuracy", "mean_f1", "mean_yes_ratio", "chair_s", "chair_i", "recall")


def is_identity(hook: Any, num_layers: int, num_heads: int) -> bool:
    """Whether an intervention's settings leave the model unchanged (alpha 1, p 0, every gamma 1)."""
    from taskmllm.model.interventions import VAR, VHR, ZeroTuning

    if hook is None:
        return True
    if isinstance(hook, VHR):
        return hook.alpha == 1.0
    if isinstance(hook, VAR):
        return hook.p == 0.0
    if isinstance(hook, ZeroTuning):
        return not hook.head_gammas(num_layers, num_heads)
    return False


def world_items(pipe: Any, n: int, seed: int) -> tuple[dict, list]:
    """One world's POPE samples ``{split: [...]}`` and caption items (the eval suites' own builders)."""
    from taskmllm.data.shapesworld import WorldConfig
    from taskmllm.eval.suites import pope_shapes_samples, shapes_items

    world = WorldConfig(num_frames=min(WorldConfig().num_frames, pipe.model.mllm.config.max_frames))
    return pope_shapes_samples(n, seed, world), shapes_items("caption", n, seed, world)


def run_world(pipe: Any, hook: Any, pope: dict, captions: list, n: int, batch_size: int):
    """Answer one world's questions under ``hook`` -> its :class:`WorldCounts`."""
    from taskmllm.data.chair import chair_ground_truth
    from taskmllm.data.shapesworld import CHAIR_SYNONYMS
    from taskmllm.eval.hallucination import ChairVocabulary
    from taskmllm.eval.paired import WorldCounts, chair_counts, pope_counts
    from taskmllm.eval.suites import answer_all, pipeline_answerer

    counts = {}
    for split, samples in pope.items():
        answers = answer_all(pipeline_answerer(pipe, 8, hook), [(s.image, s.turns[0][0]) for s in samples],
                             batch_size, f"pope/{split}", progress=False)
        counts[split] = pope_counts([r.text for r in answers], [s.meta["label"] for s in samples],
                                    [s.meta["index"] for s in samples], n)
    answers = answer_all(pipeline_answerer(pipe, 64, hook), [(it.visual, it.prompt) for it in captions], batch_size,
                         "chair", progress=False)
    vocab = ChairVocabulary.from_synonyms(CHAIR_SYNONYMS)
    return WorldCounts(counts, chair_counts([r.text for r in answers],
                                            [chair_ground_truth(it.sample) for it in captions], vocab))


def overhead(pipe: Any, hooks: dict[str, Any], pope: dict, new_tokens: int, repeats: int) -> list[dict]:
    """Latency of each method's generation (``new_tokens`` tokens, EOS off) at batch 1 and 8 on POPE prompts."""
    samples = pope["random"]
    runs = []
    for bsz in (1, 8):
        chosen = [samples[i % len(samples)] for i in range(bsz)]
        batch = pipe.processor([s.turns[0][0] for s in chosen], [s.image for s in chosen])
        timed = time_configs(pipe.model.mllm, batch, {k: (None, h) for k, h in hooks.items()}, new_tokens, repeats)
        best = timed["none"]["best_s"]
        runs.append({"batch": bsz, "new_tokens": new_tokens, "latency_s": timed,
                     "ratio_over_none": {k: round(v["best_s"] / best, 3) for k, v in timed.items()}})
    return runs


def target(diff: dict[str, dict[str, float]], none_chair_s: float) -> dict[str, Any]:
    """The issue's target for one method against ``none``."""
    rel = diff["chair_s"]["diff"] / none_chair_s if none_chair_s > 0 else 0.0
    parts = {"chair_s_relative": round(rel, 4), "chair_s_down_15pct": rel <= -0.15,
             "recall_drop_le_0.02": diff["recall"]["diff"] >= -0.02,
             "pope_adversarial_not_lower": diff["adversarial_accuracy"]["diff"] >= 0.0,
             "chair_s_interval_excludes_zero": diff["chair_s"]["hi"] < 0.0}
    return {**parts, "met": all(v for k, v in parts.items() if k != "chair_s_relative")}


def markdown(report: dict) -> str:
    """The quality table, the differences from none with their intervals, and the overhead table."""
    methods = report["methods"]
    pct = {k for k, _ in QUALITY if k.endswith(("accuracy", "f1"))}
    lines = ["| method | settings | " + " | ".join(t for _, t in QUALITY) + " |", "|" + "---|" * (len(QUALITY) + 2)]
    for name, m in methods.items():
        cells = [f"{m['mean'][k] * 100:.1f} ± {m['std'][k] * 100:.1f}" if k in pct else
                 f"{m['mean'][k]:.1f} ± {m['std'][k]:.1f}" if k == "mean_length" else
                 f"{m['mean'][k]:.3f} ± {m['std'][k]:.3f}" for k, _ in QUALITY]
        lines.append(f"| {name} | {m['settings_source']}{' (identity)' if m['identity'] else ''} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"({report['seeds']} unseen worlds x {report['n']} images; mean ± population std over worlds; "
              "accuracy and F1 in %)", "", "Difference from none, paired bootstrap 95% interval "
              f"({report['bootstrap']} resamples of images):", "",
              "| method | " + " | ".join(DIFFS) + " | target met |", "|" + "---|" * (len(DIFFS) + 2)]
    for name, m in methods.items():
        if name == "none":
            continue
        cells = [f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for d in (m["diff"][k] for k in DIFFS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if m['target']['met'] else 'no'} |")
    if report.get("overhead"):
        lines += ["", "Generation overhead (best of the rounds, EOS off, seconds and ratio to none):", "",
                  "| batch | tokens | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 2)]
        for run in report["overhead"]:
            lines.append(f"| {run['batch']} | {run['new_tokens']} | " + " | ".join(
                f"{run['latency_s'][k]['best_s']:.2f} ({run['ratio_over_none'][k]:.2f}x)" for k in methods) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=200, help="images per world")
    parser.add_argument("--seeds", type=int, default=3, help="unseen evaluation worlds")
    parser.add_argument("--methods", nargs="+", default=["none", "var", "vhr", "zerotuning"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--overhead-tokens", type=int, default=32, help="0: skip the overhead measurement")
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    if args.methods[0] != "none":
        parser.error("the first method must be none (the baseline of the differences)")

    from taskmllm.eval.paired import mean_over_worlds, paired_bootstrap
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED
    from taskmllm.model.interventions.hooks import decoder_layers, head_layout
    from taskmllm.router.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model)
    layout = (len(decoder_layers(pipe.model.mllm.llm)), head_layout(pipe.model.mllm.llm)[0])
    hooks = {name: pipe.intervention(name) for name in args.methods}
    worlds = [world_items(pipe, args.n, DEFAULT_EVAL_SEED + i) for i in range(args.seeds)]
    counts: dict[str, list] = {}
    report: dict[str, Any] = {"model": str(args.model), "n": args.n, "seeds": args.seeds, "split": "test",
                              "world_seeds": [DEFAULT_EVAL_SEED + i for i in range(args.seeds)],
                              "bootstrap": args.bootstrap, "methods": {}}
    bar = tqdm(total=len(hooks) * args.seeds, desc="hallucination (method x world)", unit="world")
    for name, hook in hooks.items():
        identity = name != "none" and is_identity(hook, *layout)
        t0 = time.perf_counter()
        bar.set_postfix(method=name)
        counts[name] = counts["none"] if identity else []
        for pope, caps in ([] if identity else worlds):
            counts[name].append(run_world(pipe, hook, pope, caps, args.n, args.batch_size))
            bar.update()
        bar.update(args.seeds if identity else 0)
        per_world = [{k: float(v) for k, v in w.metrics().items()} for w in counts[name]]
        report["methods"][name] = {
            "intervention": "none" if hook is None else repr(hook), "identity": identity,
            "settings_source": pipe.intervention_source(name) or "–",
            "mean": {k: float(v) for k, v in mean_over_worlds(counts[name]).items()},
            "std": {k: float(np.std([w[k] for w in per_world])) for k in per_world[0]},
            "per_world": per_world, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[hallucination] {name}: {report['methods'][name]['mean']}", file=sys.stderr, flush=True)
    none_chair_s = report["methods"]["none"]["mean"]["chair_s"]
    for name in hooks:
        if name != "none":
            diff = paired_bootstrap(counts[name], counts["none"], args.bootstrap)
            report["methods"][name].update(diff=diff, target=target(diff, none_chair_s))
    if args.overhead_tokens > 0:
        report["overhead"] = overhead(pipe, hooks, worlds[0][0], args.overhead_tokens, args.overhead_repeats)
    bar.close()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["markdown"] = markdown(report)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(report["markdown"])
    emit(report, args.out)


if __name__ == "__main__":
    main()
