"""taskmllm.model.interventions."""
