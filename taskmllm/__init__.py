"""taskmllm: a LLaVA-style multimodal LLM with task tokens, differentiable expert heads and VAR/VHR."""

from taskmllm.errors import TaskMLLMError

__version__ = "0.1.0"

__all__ = ["TaskMLLMError", "__version__"]
