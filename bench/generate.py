"""Generation speed: TaskMLLM.generate vs transformers' LlavaForConditionalGeneration.generate, same weights.

A random LLaVA (CLIP vision + Llama, tiny-recipe sized unless --hidden/--layers say otherwise) is saved, converted
with ``import_llava_hf``, and both generate ``--new-tokens`` greedy tokens (EOS disabled so lengths match) for
batch 1 and batch ``--batch``. Prints JSON with tokens/s of each and ours/theirs; target ratio >= 1.0.

    python bench/generate.py --out bench/results/generate.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


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


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Best wall time of each function; runs alternate (first, second, first, ...) so that machine drift
    during the measurement affects both alike."""
    first(), second()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import LlavaForConditionalGeneration

    from taskmllm.model.llava import import_llava_hf

    results = {"device": "cpu", "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        build_llava(Path(tmp), args.hidden, args.layers, vocab=1024)
        ref = LlavaForConditionalGeneration.from_pretrained(tmp, local_files_only=True).eval()
        ours = import_llava_hf(tmp)
        ours.tokenizer.eos_token = None  # no early stop: both produce exactly new_tokens
        for bsz in (1, args.batch):
            prompts = [f"Describe image {i} in detail." + " Be brief." * (i % 4) for i in range(bsz)]  # padded batch
            batch = ours.processor(prompts, [torch.rand(96, 96, 3).numpy() for _ in range(bsz)])
            n = args.new_tokens

            def run_ours():
                out = ours.generate(batch, max_new_tokens=n)
                assert all(len(s) == n for s in out.sequences)

            def run_ref():
                with torch.no_grad():
                    ref.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=batch.pixel_values, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=ours.processor.pad_id)

            t_ours, t_ref = timed_pair(run_ours, run_ref, args.repeats)
            results["runs"].append({
                "batch": bsz, "ours_tokens_per_s": round(bsz * n / t_ours, 1),
                "transformers_tokens_per_s": round(bsz * n / t_ref, 1), "ratio_ours_over_transformers":
                round(t_ref / t_ours, 3)})
    emit(results, args.out)


if __name__ == "__main__":
    main()
