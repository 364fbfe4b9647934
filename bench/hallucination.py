"""Hallucination benchmark: POPE and CHAIR on ShapesWorld with no intervention, VAR and VHR, over several seeds.

For each intervention and each of ``--seeds`` evaluation worlds (seeds ``DEFAULT_EVAL_SEED + i``: scenes never
drawn in training), runs the ``pope-shapes`` and ``chair-shapes`` suites (``taskmllm eval`` runs the same
suites one at a time) and reports every metric as mean ± std over the seeds (population std), as JSON and a
markdown table (``--md``) for the README.

    python bench/hallucination.py --model tiny --n 100 --seeds 3 --out bench/results/hallucination.json \
        --md bench/results/hallucination.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

#: (suite, metric key, column title); POPE metrics are per split, CHAIR metrics per caption set.
COLUMNS = (("pope", "random.f1", "POPE rand F1"), ("pope", "popular.f1", "POPE pop F1"),
           ("pope", "adversarial.f1", "POPE adv F1"), ("pope", "mean_accuracy", "POPE acc"),
           ("pope", "mean_yes_ratio", "POPE yes ratio"), ("chair", "chair_s", "CHAIR_S ↓"),
           ("chair", "chair_i", "CHAIR_I ↓"), ("chair", "recall", "CHAIR recall"))


def metrics_of(pope: dict, chair: dict) -> dict[str, float]:
    """The COLUMNS' values of one seed's ``pope-shapes`` summary and ``chair-shapes`` metrics."""
    out = {}
    for suite, key, _ in COLUMNS:
        if suite == "pope":
            split, _, name = key.partition(".")
            out[key] = pope["splits"][split][name] if name else pope[key]
        else:
            out[key] = chair[key]
    return out


def table(summary: dict[str, dict[str, dict[str, float]]], n: int, seeds: int) -> str:
    """Markdown: one row per intervention, ``mean ± std`` per column (F1/accuracy in percent)."""
    head = "| intervention | " + " | ".join(t for _, _, t in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, stats in summary.items():
        cells = []
        for _, key, _ in COLUMNS:
            scale = 1.0 if key == "mean_yes_ratio" or key.startswith("chair") or key == "recall" else 100.0
            cells.append(f"{stats[key]['mean'] * scale:.1f} ± {stats[key]['std'] * scale:.1f}" if scale == 100.0
                         else f"{stats[key]['mean']:.3f} ± {stats[key]['std']:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\n({seeds} seeds x {n} images per suite; mean ± population std over seeds)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--n", type=int, default=100, help="images per suite and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--interventions", nargs="+", default=["none", "var", "vhr"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()

    from taskmllm.data.shapesworld import WorldConfig
    from taskmllm.eval.benchmarks import SUITES, EvalOptions, make_intervention, run_suite
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED, pipeline_answerer
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model)
    mllm = pipe.model.mllm
    world = WorldConfig(num_frames=min(WorldConfig().num_frames, mllm.config.max_frames))
    per_run, summary = {}, {}
    for name in args.interventions:
        hook = make_intervention(name, mllm.hidden_size)
        runs = []
        for i in range(args.seeds):
            options = replace(EvalOptions(n=args.n, world=world, progress=False), seed=DEFAULT_EVAL_SEED + i)
            start = time.perf_counter()
            pope = run_suite("pope-shapes", pipeline_answerer(pipe, SUITES["pope-shapes"].max_new_tokens, hook),
                             options).results["pope"]
            chair = run_suite("chair-shapes", pipeline_answerer(pipe, SUITES["chair-shapes"].max_new_tokens, hook),
                              options).results["chair"]
            runs.append({"seed": options.seed, "wall_s": round(time.perf_counter() - start, 1),
                         **metrics_of(pope, chair)})
            print(f"[hallucination] {name} seed {options.seed}: {runs[-1]}", file=sys.stderr, flush=True)
        per_run[name] = runs
        summary[name] = {key: {"mean": statistics.fmean(r[key] for r in runs),
                               "std": statistics.pstdev([r[key] for r in runs])} for _, key, _ in COLUMNS}
        summary[name]["intervention"] = repr(hook) if hook is not None else "none"
    md = table({k: {c: v for c, v in s.items() if c != "intervention"} for k, s in summary.items()}, args.n,
               args.seeds)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    emit({"model": str(args.model), "n": args.n, "seeds": args.seeds, "summary": summary, "runs": per_run,
          "markdown": md}, args.out)


if __name__ == "__main__":
    main()
