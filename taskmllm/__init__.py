"""taskmllm: a LLaVA-style multimodal LLM with task tokens, differentiable expert heads and VAR/VHR/ZeroTuning.

Public API (imported on first use, so ``import taskmllm`` stays light)::

    from taskmllm import Pipeline, VHR
    pipe = Pipeline.from_pretrained("path/to/checkpoint")
    result = pipe(image, "Segment the red circle.", intervention=VHR())
    result = pipe(image, "Is there a star?", intervention="vhr")  # the model's calibrated VHR settings
"""

from __future__ import annotations

import importlib
from typing import Any

from taskmllm.errors import TaskMLLMError

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "taskmllm.router.pipeline",
    "Result": "taskmllm.router.result",
    "JointModel": "taskmllm.router.joint",
    "TaskMLLM": "taskmllm.model.mllm",
    "VAR": "taskmllm.model.interventions",
    "VHR": "taskmllm.model.interventions",
    "ZeroTuning": "taskmllm.model.interventions",
}

__all__ = ["TaskMLLMError", "__version__", "load_model", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taskmllm' has no attribute {name!r}")


def load_model(path: str, device: str = "cpu"):
    """Load a checkpoint directory (or a shipped model by name, ``"tiny"``): a :class:`JointModel` when it has ``experts/``, else a :class:`TaskMLLM`."""
    from taskmllm.zoo import resolve_checkpoint

    path = resolve_checkpoint(path)
    if (path / "experts").is_dir():
        from taskmllm.router.joint import JointModel

        return JointModel.from_pretrained(path, device=device)
    from taskmllm.model.mllm import TaskMLLM

    return TaskMLLM.from_pretrained(path, device=device)
