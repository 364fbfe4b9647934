"""Timing helpers of the benchmarks: generation latency of several configurations of one model, timed interleaved
(shared by the intervention benchmarks: ``bench/interventions.py`` on a random model, ``bench/hallucination.py`` on
a shipped one), and paired ratios of such rounds. The best of several calls is the package's own
:func:`taskmllm.model.weight_layout.best_seconds`."""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional


def time_configs(model: Any, batch: Any, configs: dict[str, tuple[Optional[str], Any]], new_tokens: int,
                 repeats: int) -> dict[str, dict[str, float]]:
    """Time ``model.generate(batch, new_tokens, intervention)`` for every ``{name: (attention implementation or
    None = the model's own, intervention)}``, interleaved over ``repeats`` rounds after one warm-up round (the best
    round is the least disturbed on a shared machine; at one torch thread the clock is the process's CPU time, which
other processes' load does not inflate). The model's EOS is disabled meanwhile, so every
    configuration generates exactly ``new_tokens`` tokens (restored afterwards, as is the attention implementation).

    Returns:
        ``{name: {"best_s", "median_s", "rounds_s"}}`` (``rounds_s``: every timed round in order, for paired ratios:
        :func:`paired_ratio`).
    """
    import torch

    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter  # CPU time at one thread
    tokenizer = model.tokenizer
    eos, attn = tokenizer.eos_token, model.llm.config._attn_implementation
    tokenizer.eos_token = None
    times: dict[str, list[float]] = {k: [] for k in configs}
    try:
        for round_ in range(repeats + 1):  # round 0 is a warm-up
            for name, (impl, intervention) in configs.items():
                model.llm.set_attn_implementation(impl or attn)
                start = clock()
                out = model.generate(batch, max_new_tokens=new_tokens, intervention=intervention)
                elapsed = clock() - start
                assert all(sum(t != model.query_id for t in s) == new_tokens for s in out.sequences)
                if round_:
                    times[name].append(elapsed)
    finally:
        tokenizer.eos_token = eos
        model.llm.set_attn_implementation(attn)
    return {k: {"best_s": round(min(v), 4), "median_s": round(statistics.median(v), 4),
                "rounds_s": [round(t, 5) for t in v]} for k, v in times.items()}


def paired_ratio(num: list[float], den: list[float], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The median of the per-round ratios ``num[r] / den[r]`` of two configurations timed in the same rounds, with
    a 95% percentile-bootstrap interval (``scipy.stats.bootstrap``: rounds resampled with replacement). A ratio
    within a round cancels what drifts between rounds (the machine's speed, its caches' state), which the ratio of
    two best rounds does not.

    Returns:
        ``{"median": float, "ci95": [low, high], "rounds": int}``.
    """
    import numpy as np
    from scipy.stats import bootstrap

    ratios = np.asarray(num, dtype=float) / np.asarray(den, dtype=float)
    interval = bootstrap((ratios,), np.median, confidence_level=0.95, method="percentile", n_resamples=resamples,
                         random_state=seed).confidence_interval
    return {"median": round(float(np.median(ratios)), 3),
            "ci95": [round(float(interval.low), 3), round(float(interval.high), 3)], "rounds": len(ratios)}
