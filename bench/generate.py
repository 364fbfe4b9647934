"""Generation speed: TaskMLLM.generate vs transformers' LlavaForConditionalGeneration.generate, same weights.

A random LLaVA (CLIP vision + Llama, tiny-recipe sized unless --hidden/--layers say otherwise) is saved, converted
with ``import_llava_hf``, and both generate ``--new-tokens`` greedy tokens (EOS disabled so lengths match) for
batch 1 and batch ``--batch``: ours with the default decoder and with ``compile=True`` (after its one-time warm-up,
reported), transformers' ``generate`` as users call it. Runs alternate within each round; ratios use each one's
best round, and ``paired`` gives the median of the per-round speed-ups (transformers' time / ours in the same round)
with a 95% bootstrap interval (``_timing.paired_ratio``). Every run's tokens must equal transformers' (asserted).
Prints JSON with tokens/s, the ratios (target >= 1.5, issue #29), the measured memory-read bandwidth and the
fraction of the bound it sets (weights read once per step), the torch threads and the load average.
``--device cuda`` runs both on a GPU (fp32; the bandwidth probe then reads the GPU's memory).

    python bench/generate.py --out bench/results/generate.json
    python bench/generate.py --device cuda --batch 32 --out bench/results/generate_cuda.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _bandwidth import machine, read_bandwidth, weight_bytes
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from _timing import paired_ratio


def build_llava(path: Path, hidden: int, layers: int, vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from taskmllm.model.tokenizer import train_bpe_tokenizer

    texts = ["USER: What is in the image? ASSISTANT: A red circle left of a blue square."] * 50
    tok = train_bpe_tokenizer(texts, vocab_size=vocab)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=None,
                       pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                              image_size=96, patch_size=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)


def timed(fns: dict, repeats: int, clock=time.perf_counter) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Warm-up time and every round's time of each function on ``clock``; runs alternate (a, b, c, a, ...) so that
    machine drift during the measurement affects all alike."""
    warm, rounds = {}, {k: [] for k in fns}
    for name, fn in fns.items():
        start = clock()
        fn()
        warm[name] = clock() - start
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            rounds[name].append(clock() - start)
    return warm, rounds


def clock_for(threads: int):
    """The process's CPU time at one thread (what a dedicated core would take: a shared machine's other load does
    not count), wall time otherwise (several threads' CPU time is not the latency)."""
    return time.process_time if threads == 1 else time.perf_counter


def run_batch(ours, ref, bsz: int, n: int, repeats: int, llm_bytes: int, bandwidth: float) -> dict:
    """One batch size: tokens of each decoder checked against transformers', then timed interleaved (every run
    ends in ``tolist()``, which waits for a GPU's queued work)."""
    prompts = [f"Describe image {i} in detail." + " Be brief." * (i % 4) for i in range(bsz)]  # padded batch
    batch = ours.processor(prompts, [torch.rand(96, 96, 3).numpy() for _ in range(bsz)]).to(ours.device)

    def run_ref():
        with torch.no_grad():
            out = ref.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               pixel_values=batch.pixel_values, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=ours.processor.pad_id)
        return out[:, batch.input_ids.shape[1]:].tolist()

    want = run_ref()
    fns = {"transformers": run_ref}
    for name, compile in (("ours", False), ("ours_compiled", True)):
        fns[name] = lambda compile=compile: ours.generate(batch, max_new_tokens=n, compile=compile).sequences
    clock = clock_for(torch.get_num_threads()) if ours.device.type == "cpu" else time.perf_counter
    warm, rounds = timed(fns, repeats, clock)
    best = {name: min(times) for name, times in rounds.items()}
    same = {name: fn() == want for name, fn in fns.items() if name != "transformers"}
    assert all(same.values()), f"tokens differ from transformers': {same}"
    rate = {k: round(bsz * n / v, 1) for k, v in best.items()}
    bound = bandwidth * 1e9 / llm_bytes  # steps/s if a step only read the LLM's weights once
    return {"batch": bsz, "clock": "cpu" if clock is time.process_time else "wall", "tokens_per_s": rate,
            "identical_tokens": same,
            "ratio_ours_over_transformers": round(best["transformers"] / best["ours"], 3),
            "ratio_ours_compiled_over_transformers": round(best["transformers"] / best["ours_compiled"], 3),
            "paired": {f"{name}_over_transformers": paired_ratio(rounds["transformers"], rounds[name])
                       for name in ("ours", "ours_compiled")},
            "compile_warmup_s": round(warm["ours_compiled"], 1),
            "bandwidth_bound_steps_per_s": round(bound, 1),
            "fraction_of_bound_compiled": round(n / best["ours_compiled"] / bound, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlavaForConditionalGeneration

    from taskmllm.model.llava import import_llava_hf

    results = {**machine(args.device), "new_tokens": args.new_tokens,
               "read_bandwidth_gb_s": read_bandwidth(device=args.device), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        build_llava(Path(tmp), args.hidden, args.layers, vocab=1024)
        ref = LlavaForConditionalGeneration.from_pretrained(tmp, local_files_only=True).eval().to(args.device)
        ours = import_llava_hf(tmp).to(args.device)
        ours.tokenizer.eos_token = None  # no early stop: both produce exactly new_tokens
        llm_bytes = weight_bytes(ours.llm)
        results["llm_weight_mb"] = round(llm_bytes / 2**20, 1)
        for bsz in (1, args.batch):
            results["runs"].append(run_batch(ours, ref, bsz, args.new_tokens, args.repeats, llm_bytes,
                                             results["read_bandwidth_gb_s"]))
    emit(results, args.out)


if __name__ == "__main__":
    main()
