"""Decode speed of a shipped model per weight dtype at batch 1, against the memory-bandwidth bound of that dtype.

A batch-1 decode step reads every LLM weight once, so steps/s cannot exceed ``read bandwidth / LLM weight bytes``
(the bandwidth measured by a large-array read probe in the same run, at the same torch threads). For each dtype
the model is loaded straight into it (``Pipeline.from_pretrained(model, dtype=...)``); the per-token decode time
is separated from the prefill as ``(t(N) - t(1)) / (N - 1)`` (N tokens generated with EOS off), best of
``--repeats`` interleaved rounds, with the default decoder and with ``compile=True``. Then the answers to the
factual questions of ``tests/smol`` (greedy, 32 tokens) in each dtype, from the default and the compiled decoder,
are compared with the first dtype's default answers (float32 by default): how many are the same text, and how
many name the right answer (issue #29: ``smol`` decode >= 60% of its dtype's bound, answers equal to float32).
Each dtype is timed with the weights as stored and with ``weight_layout="tuned"`` (each LLM weight shape in the
memory order the BLAS streams fastest, timed at load).
``int8`` / ``int4`` are ``Pipeline.from_pretrained(model, dtype=torch.bfloat16, quantize=...)``: integer weights
(bound: their bytes with the scales) with bfloat16 activations, as stored only.

    python bench/decode.py --model smol --threads 1 --out bench/results/decode_smol.json
    python bench/decode.py --model smol --threads 1 --dtypes float32 bfloat16 int8 int4 --layouts stored
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _bandwidth import machine, read_bandwidth, weight_bytes
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the question set
from tests.smol.test_shipped import FACTS  # noqa: E402

#: name -> (dtype of the activations and float weights, quantization of the LLM's linear layers)
VARIANTS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "float16": (torch.float16, None),
            "int8": (torch.bfloat16, "int8"), "int4": (torch.bfloat16, "int4")}
PROMPT = "Write a short story about a cat who learns to swim."


def generate_s(model, batch, tokens: int, compile: bool, clock) -> float:
    """Seconds of one ``generate`` of exactly ``tokens`` new tokens (the caller disabled EOS)."""
    start = clock()
    out = model.generate(batch, max_new_tokens=tokens, compile=compile)
    elapsed = clock() - start
    assert sum(t != model.query_id for t in out.sequences[0]) == tokens, "EOS must be off while timing"
    return elapsed


def decode_rates(model, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per decoder (``default``, ``compiled``): best per-token decode seconds and tokens/s, interleaved rounds
    after one warm-up round (which also builds the compiled step)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter  # CPU time at one thread
    batch = model.processor([PROMPT], [None]).to(model.device)
    eos = model.tokenizer.eos_token
    model.tokenizer.eos_token = None
    best = {name: float("inf") for name in ("default", "compiled")}
    try:
        with torch.no_grad():
            for round_ in range(repeats + 1):
                for name in best:
                    compile = name == "compiled"
                    step = (generate_s(model, batch, tokens, compile, clock)
                            - generate_s(model, batch, 1, compile, clock)) / (tokens - 1)
                    if round_:
                        best[name] = min(best[name], step)
    finally:
        model.tokenizer.eos_token = eos
    return {name: {"step_s": round(s, 5), "tokens_per_s": round(1 / s, 2)} for name, s in best.items()}


def factual_answers(pipe, compile: bool = False) -> list[str]:
    """Greedy answers (32 tokens) to the factual questions of ``tests/smol``, from the default or compiled decoder."""
    return [pipe(None, q, max_new_tokens=32, compile=compile).text for q, _ in FACTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a shipped model's name or a checkpoint directory")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(VARIANTS),
                        help="the first is the reference for the answers; int8 / int4: integer weights with "
                             "bfloat16 activations (Pipeline.from_pretrained(quantize=...))")
    parser.add_argument("--layouts", nargs="+", default=["stored", "tuned"], choices=["stored", "tuned"],
                        help="weight layouts (Pipeline.from_pretrained(weight_layout=...)); each dtype in each")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from taskmllm.router.pipeline import Pipeline

    bandwidth = read_bandwidth()
    report = {**machine(), "model": args.model, "new_tokens": args.new_tokens, "read_bandwidth_gb_s": bandwidth,
              "clock": "cpu" if torch.get_num_threads() == 1 else "wall", "dtypes": {}}
    reference = None
    for name in args.dtypes:
        dtype, quantize = VARIANTS[name]
        for layout in args.layouts if quantize is None else ["stored"]:  # layouts order float weights only
            pipe = Pipeline.from_pretrained(args.model, dtype=dtype, weight_layout=layout, quantize=quantize)
            llm_bytes = weight_bytes(pipe.model.mllm.llm)
            bound = bandwidth * 1e9 / llm_bytes  # steps/s if a step only read the LLM's weights once
            rates = decode_rates(pipe.model.mllm, args.new_tokens, args.repeats)
            answers = factual_answers(pipe)
            compiled_answers = factual_answers(pipe, compile=True)
            reference = answers if reference is None else reference
            report["dtypes"][name if layout == "stored" else f"{name}+{layout}"] = {
                "activations": str(dtype).removeprefix("torch."), "llm_weight_mb": round(llm_bytes / 1e6, 1),
                "bound_tokens_per_s": round(bound, 2), **rates,
                "fraction_of_bound": {k: round(v["tokens_per_s"] / bound, 3) for k, v in rates.items()},
                "answers_equal_to_reference": sum(a == r for a, r in zip(answers, reference)),
                "compiled_answers_equal_to_reference": sum(a == r for a, r in zip(compiled_answers, reference)),
                "answers_right": sum(any(w.lower() in a.lower() for w in words)
                                     for a, (_, words) in zip(answers, FACTS)),
                "questions": len(FACTS), "answers": answers, "compiled_answers": compiled_answers}
            del pipe
    emit(report, args.out)

if __name__ == "__main__":
    main()
