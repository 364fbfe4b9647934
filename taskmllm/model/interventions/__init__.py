"""Training-free inference interventions on the LLM: VHR (head reinforcement), VAR (attention redistribution) and
ZeroTuning (initial-token attention scaling).

All three are objects passed as ``intervention=`` to ``TaskMLLM.generate`` (their ``attach(model, context)`` returns a
context manager that installs scoped hooks and removes them on exit, also after an exception), or used directly::

    with VAR(mode="official").attach(model, batch):
        logits = model(batch).logits
"""

from taskmllm.model.interventions.attention_map import AttentionMaps, attention_maps, compare_attention_maps
from taskmllm.model.interventions.hooks import context_for
from taskmllm.model.interventions.redistribution import redistribute
from taskmllm.model.interventions.sinks import calibrate_sink_dims, default_tau, sink_values
from taskmllm.model.interventions.var import VAR
from taskmllm.model.interventions.vhr import VHR, default_layers, select_heads
from taskmllm.model.interventions.zerotuning import InitialTokenBias, ZeroTuning
from taskmllm.model.interventions.zerotuning_calibration import (accuracy_score, all_heads, calibrate_from_profile,
                                                                 calibrate_gamma, entropy_score, gradient_profile,
                                                                 likelihood_score, profile_heads)

__all__ = ["VAR", "VHR", "AttentionMaps", "InitialTokenBias", "ZeroTuning", "accuracy_score", "all_heads",
           "attention_maps", "calibrate_from_profile", "calibrate_gamma", "calibrate_sink_dims",
           "compare_attention_maps", "context_for", "default_layers", "default_tau", "entropy_score",
           "gradient_profile", "likelihood_score", "profile_heads", "redistribute", "select_heads", "sink_values"]
