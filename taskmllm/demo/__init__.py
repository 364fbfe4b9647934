"""taskmllm.demo."""
