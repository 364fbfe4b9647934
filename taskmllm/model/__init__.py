"""taskmllm.model."""
