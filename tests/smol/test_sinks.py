"""VAR's automatic calibration finds SmolLM2-135M's sink dimensions (reported in the README, "smol recipe").

Measured: at the paper's tau = 20 (reachable: sqrt(576) = 24), dimensions 17 and 507 on every calibration
prompt, with or without an image. Dimension 507 is the classic sink: the first token (``<|im_start|>``) holds
|x|/RMS ~ 23.8 there entering layers 2-29 (except 10-11; in layers 2-10 one early ' the' or newline is a
second sink). Dimension 17 passes 20 only entering the last two layers (28-29; 15 from layer 25).
``python bench/smol_sinks.py`` prints the full report."""

from __future__ import annotations

from tests.smol.conftest import require_smol_packages

require_smol_packages()

SMOL_SINK_DIMS = [17, 507]
TEXT_PROMPTS = ["Write a haiku about autumn.", "What is 12 times 7?", "Translate 'good morning' to French.",
                "Describe the image in detail.", "How many objects are there?"]


def test_calibration_finds_smollm2_sink_dims(smol_model):
    from taskmllm.model.interventions.sinks import calibrate_sink_dims

    dims = calibrate_sink_dims(smol_model)  # default prompts, half with a random image
    print(f"SmolLM2-135M sink dims (tau=20): {dims}")
    assert dims == SMOL_SINK_DIMS
    text_only = smol_model.processor(TEXT_PROMPTS, [None] * len(TEXT_PROMPTS))
    assert calibrate_sink_dims(smol_model, batch=text_only) == SMOL_SINK_DIMS  # a property of the LLM itself


def test_first_token_is_the_sink_in_dim_507(smol_model):
    import torch

    from taskmllm.model.interventions.hooks import HookSet, decoder_layers
    from taskmllm.model.interventions.sinks import sink_flags

    batch = smol_model.processor(["Is there a red circle in the image?"], [None])
    flags: list[torch.Tensor] = []
    hooks = HookSet()
    try:
        for layer in decoder_layers(smol_model.llm)[2:]:
            hooks.forward_pre(layer, lambda m, a, k: flags.append(sink_flags((a[0] if a else k["hidden_states"])[0],
                                                                             [507], 20.0)), with_kwargs=True)
        with torch.no_grad():
            smol_model(batch)
    finally:
        hooks.remove()
    assert all(int(f.sum()) <= 2 for f in flags)  # sinks are few: <|im_start|>, in layers 2-10 also one ' the'
    assert sum(bool(f[0]) for f in flags) >= len(flags) - 2  # the first token, entering (almost) every layer
    assert all(bool(f[0]) and int(f.sum()) == 1 for f in flags[10:])  # from layer 12 on, only the first token


def test_lower_tau_adds_weaker_dims(smol_model):
    from taskmllm.model.interventions.sinks import calibrate_sink_dims

    text_only = smol_model.processor(TEXT_PROMPTS, [None] * len(TEXT_PROMPTS))
    assert set(SMOL_SINK_DIMS) < set(calibrate_sink_dims(smol_model, tau=15.0, batch=text_only))
