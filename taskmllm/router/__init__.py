"""taskmllm.router."""
