"""taskmllm.training."""
