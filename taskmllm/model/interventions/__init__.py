"""Training-free inference interventions on the LLM: VHR (head reinforcement) and VAR (attention redistribution).

Both are objects passed as ``intervention=`` to ``TaskMLLM.generate`` (their ``attach(model, context)`` returns a
context manager that installs scoped hooks and removes them on exit, also after an exception), or used directly::

    with VAR(mode="official").attach(model, batch):
        logits = model(batch).logits
"""

from taskmllm.model.interventions.hooks import context_for
from taskmllm.model.interventions.sinks import calibrate_sink_dims, default_tau, sink_values
from taskmllm.model.interventions.var import VAR, redistribute
from taskmllm.model.interventions.vhr import VHR, default_layers, select_heads

__all__ = ["VAR", "VHR", "calibrate_sink_dims", "context_for", "default_layers", "default_tau", "redistribute",
           "select_heads", "sink_values"]
