"""ZeroTuning's head profile two ways on one model: the paper's (each head scaled up and down alone, ``2 * heads + 1``
forwards, :func:`profile_heads`) and its first-order estimate from one backward (:func:`gradient_profile`), on the
same val POPE questions (the ones ``taskmllm calibrate --intervention zerotuning`` profiles on).

The scaled profile runs on the heads of ``--layers`` only (all heads of a 30-layer model take hours on a CPU); the
gradient profile classifies every head, and is compared on those. Reported: seconds of each, the kinds' agreement
(up / down / neutral), the rank correlation of the predicted and measured gains, and each profile's up/down
counts.

    python bench/zerotuning_profile.py --model smol --profile-n 5 --layers 0 7 15 22 29 --out bench/results/zt_profile_smol.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--profile-n", type=int, default=5, help="val scenes whose POPE questions profile")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 22, 29], help="layers scaled per head")
    parser.add_argument("--gamma-up", type=float, default=2.0)
    parser.add_argument("--gamma-down", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from scipy.stats import spearmanr

    from taskmllm.eval.calibration_run import CalibrationOptions, ValSuite
    from taskmllm.model.interventions import all_heads, gradient_profile, likelihood_score, profile_heads
    from taskmllm.router.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    mllm = pipe.model.mllm
    batch, candidates, labels = ValSuite(pipe, CalibrationOptions(n=args.profile_n, progress=False)).yes_no_batch(
        args.profile_n)
    heads = all_heads(mllm, layers=args.layers)

    start = time.perf_counter()
    grad = gradient_profile(mllm, batch, candidates, labels, gamma_up=args.gamma_up, gamma_down=args.gamma_down)
    grad_s = time.perf_counter() - start
    start = time.perf_counter()
    scaled = profile_heads(likelihood_score(mllm, batch, candidates, labels), heads, args.gamma_up, args.gamma_down)
    scaled_s = time.perf_counter() - start

    agree = sum(grad.kinds[h] == scaled.kinds[h] for h in heads) / len(heads)
    rho = {side: float(spearmanr([getattr(grad, side)[h] for h in heads],
                                 [getattr(scaled, side)[h] for h in heads]).statistic) for side in ("up", "down")}
    count = lambda p, hs: {k: sum(p.kinds[h] == k for h in hs) for k in ("up", "down", "neutral")}  # noqa: E731
    emit({"model": str(args.model), "questions": len(labels), "layers": args.layers, "heads_compared": len(heads),
          "heads_total": len(all_heads(mllm)), "gamma_up": args.gamma_up, "gamma_down": args.gamma_down,
          "seconds": {"gradient_all_heads": round(grad_s, 2), "scaled_compared_heads": round(scaled_s, 2),
                      "scaled_all_heads_estimate": round(scaled_s * len(all_heads(mllm)) / len(heads), 1)},
          "kind_agreement": round(agree, 3), "spearman_gain": {k: round(v, 3) for k, v in rho.items()},
          "counts": {"gradient_compared": count(grad, heads), "scaled_compared": count(scaled, heads),
                     "gradient_all": count(grad, list(grad.kinds))},
          "base_score": scaled.base}, args.out)


if __name__ == "__main__":
    main()
