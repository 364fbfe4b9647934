"""Time and memory per stage of the ``llava`` recipe on LLaVA-1.5-7B, **estimated from FLOPs** (not measured), as JSON.

Usage: ``python bench/llava_estimate.py [--gpus 8] [--peak-tflops 989] [--mfu 0.4] [--steps N] [--out FILE]``.

Model: Vicuna-7B (Llama, d 4096, 32 layers, MLP 11008, vocabulary 32000) + CLIP ViT-L/14 at 336 px (24 layers,
width 1024, 577 tokens, 576 visual tokens per frame after dropping the class token). Batch, sources and steps come
from the recipe's YAMLs (``taskmllm/training/recipes/llava``: 4 per GPU x 4 accumulation x 8 GPUs = 128; bf16;
ZeRO-2; heads does not read the conversation source).

The sums (standard estimates; every assumption is an argument):

- LLM forward FLOPs per token ``2 N + 2 L T d`` (Kaplan et al. 2020: weights + attention over a context of T);
  every stage backpropagates through the LLM without weight gradients for it (LoRA in assign and joint: the
  adapters are ~0.6% of the weights; heads: the task queries are LLM inputs), which costs about one more
  forward: **training step = 2 x forward** (a full fine-tune would be 3 x). The frozen CLIP tower and projector
  run forward only; the experts (a few M parameters) are negligible.
- Tokens per sample: 576 per frame plus text: grounded questions (refcoco, coco) ~40 text tokens, MOT clips
  ``clip_len`` frames + ~40, LLaVA conversations ~300 text tokens (``--chat-tokens``), mixed by the recipe's
  source weights.
- Memory per GPU: the frozen weights in bf16 (2 bytes per parameter, replicated by ZeRO-2), the trainable
  parameters' fp32 master copy and Adam moments sharded over the GPUs (12 bytes / G) and their bf16 copy and
  gradient (4 bytes), activations ``34 d`` bytes per token per layer (Korthikanti et al. 2022, bf16, no
  recomputation, flash attention: no ``s^2`` term) for the typical and for the largest micro-batch (4 MOT clips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

RECIPE = Path(__file__).resolve().parents[1] / "taskmllm" / "training" / "recipes" / "llava"
LLM = {"d": 4096, "layers": 32, "mlp": 11008, "vocab": 32000}
CLIP = {"d": 1024, "layers": 24, "mlp": 4096, "tokens": 577}
VISUAL_TOKENS = 576


def llm_params(d: int, layers: int, mlp: int, vocab: int) -> dict[str, float]:
    """Parameter counts of a Llama: the blocks (attention 4 d^2, gated MLP 3 d m), embeddings, LoRA r16."""
    block = 4 * d * d + 3 * d * mlp
    lora = layers * 16 * (4 * (d + d) + 3 * (d + mlp)) + 16 * (d + vocab)  # every linear layer + lm_head
    return {"blocks": layers * block, "embeddings": 2 * vocab * d, "lora_r16": lora}


def sample_tokens(sources: dict, chat_tokens: int, grounded_tokens: int = 40) -> dict[str, float]:
    """Average tokens and frames per sample of the recipe's mix (weights of the sources)."""
    tokens = {"refcoco": (VISUAL_TOKENS + grounded_tokens, 1), "coco": (VISUAL_TOKENS + grounded_tokens, 1),
              "chat": (VISUAL_TOKENS + chat_tokens, 1)}
    clip = int(sources["mot"].get("clip_len", 8))
    tokens["mot"] = (clip * VISUAL_TOKENS + grounded_tokens, clip)
    weights = {name: float(spec.get("weight", 1.0)) for name, spec in sources.items()}
    total = sum(weights.values())
    mean = sum(weights[n] * tokens[n][0] for n in weights) / total
    frames = sum(weights[n] * tokens[n][1] for n in weights) / total
    return {"mean_tokens": mean, "mean_frames": frames, "largest_sample_tokens": tokens["mot"][0]}


def _stage(name: str) -> dict:
    """A stage YAML merged over ``_base.yaml`` (one level of ``inherit``, as the recipe's files use)."""
    def merge(base: dict, top: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in top.items()}}

    top = yaml.safe_load((RECIPE / f"{name}.yaml").read_text())
    top.pop("inherit", None)
    return merge(yaml.safe_load((RECIPE / "_base.yaml").read_text()), top)


def stage_estimate(cfg: dict, gpus: int, peak_tflops: float, mfu: float, steps: int | None,
                   chat_tokens: int) -> dict:
    """Seconds per step, hours for the stage's steps and GB per GPU of one stage's config."""
    per_gpu, accum = int(cfg["data"]["batch_size"]), int(cfg["grad_accum"])
    global_batch = per_gpu * accum * gpus
    p = llm_params(**LLM)
    n = p["blocks"] + p["embeddings"] / 2  # the LM head's matmul counts, the input lookup does not
    sources = {k: v for k, v in cfg["data"]["sources"].items() if float(v.get("weight", 1.0)) > 0}
    mix = sample_tokens(sources, chat_tokens)
    t = mix["mean_tokens"]
    llm_forward = (2 * n + 2 * LLM["layers"] * t * LLM["d"]) * t
    clip_params = CLIP["layers"] * (4 * CLIP["d"] ** 2 + 2 * CLIP["d"] * CLIP["mlp"])
    vision_forward = 2 * clip_params * CLIP["tokens"] * mix["mean_frames"]
    step_flops = global_batch * (2 * llm_forward + vision_forward)
    seconds = step_flops / (gpus * peak_tflops * 1e12 * mfu)
    frozen = 2 * (n + p["embeddings"] / 2 + clip_params)
    trainable = p["lora_r16"] + 3 * 5e6  # LoRA + three experts of a few M parameters
    states = trainable * (12 / gpus + 4)
    per_token = 34 * LLM["d"] * LLM["layers"]
    typical, largest = per_gpu * t * per_token, per_gpu * mix["largest_sample_tokens"] * per_token
    steps = steps or int(cfg["max_steps"])
    gb = 2 ** 30
    return {"global_batch": global_batch, "tokens_per_sample": round(t),
            "frames_per_sample": round(mix["mean_frames"], 2),
            "tflop_per_step": round(step_flops / 1e12, 1), "s_per_step": round(seconds, 2), "steps": steps,
            "hours": round(seconds * steps / 3600, 2),
            "memory_gb_per_gpu_typical": round((frozen + states + typical) / gb, 1),
            "memory_gb_per_gpu_largest_micro_batch": round((frozen + states + largest) / gb, 1)}


def estimate(gpus: int, peak_tflops: float, mfu: float, steps: int | None, chat_tokens: int) -> dict:
    """Every stage's :func:`stage_estimate` and the model's parameter counts."""
    p = llm_params(**LLM)
    clip_params = CLIP["layers"] * (4 * CLIP["d"] ** 2 + 2 * CLIP["d"] * CLIP["mlp"])
    stages = {name: stage_estimate(_stage(name), gpus, peak_tflops, mfu, steps, chat_tokens)
              for name in ("assign", "heads", "joint")}
    return {"estimate": "from FLOPs, not measured", "gpus": gpus, "peak_tflops_bf16": peak_tflops, "mfu": mfu,
            "params": {"llm": round(p["blocks"] + p["embeddings"]), "clip": clip_params, "lora_r16": p["lora_r16"]},
            "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM 989, "
                                                                          "A100 312)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default: the YAMLs' max_steps)")
    parser.add_argument("--chat-tokens", type=int, default=300, help="text tokens of a LLaVA conversation")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout)")
    args = parser.parse_args()
    result = estimate(args.gpus, args.peak_tflops, args.mfu, args.steps, args.chat_tokens)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
