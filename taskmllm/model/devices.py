"""Device names from users (``--device``, ``device=``) checked before any model is built or loaded."""

from __future__ import annotations

from typing import Union

import torch

from taskmllm.errors import ConfigError


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    Raises:
        ConfigError: not a device name torch knows (``"foo"``), or a CUDA / MPS device this machine does not have
            (``"cuda:7"`` with fewer GPUs); the message says what is available.
    """
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {str(device)!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} is not available: this machine has no MPS device")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ConfigError(f"device {str(device)!r} is not supported: use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev
