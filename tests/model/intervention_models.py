"""Tiny models shared by the VHR / VAR tests (random weights large enough that greedy decoding varies)."""

from __future__ import annotations

import numpy as np
import torch

from taskmllm.model.mllm import TaskMLLM
from tests.conftest import tiny_config

PROMPTS = ["Is there a red circle?", "What color is the square in the image?", "Track the yellow heart."]


def varied_model(tokenizer, layers: int = 4, seed: int = 3, init: float = 0.4, attn: str = "sdpa") -> TaskMLLM:
    """A random 4-layer tiny TaskMLLM (hidden 64, 4 heads, 2 KV heads) with the given attention backend."""
    torch.manual_seed(seed)
    cfg = tiny_config(tokenizer, layers=layers)
    cfg.llm["initializer_range"] = init
    model = TaskMLLM(cfg, tokenizer).eval()
    model.llm.set_attn_implementation(attn)
    return model


def plant_sink(model: TaskMLLM, token_id: int, dim: int, value: float = 50.0) -> None:
    """Give ``token_id``'s input embedding one massive dimension (a planted attention sink)."""
    with torch.no_grad():
        emb = model.llm.get_input_embeddings().weight
        emb[token_id] = 0.01 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
        emb[token_id, dim] = value


def images(seed: int = 0):
    """Per prompt of :data:`PROMPTS`: an image, none (text only), another image."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return [a, None, b]


def plant_image_sinks(model: TaskMLLM, dim: int, tokens: list[int], value: float = 1000.0):
    """Give visual tokens ``tokens`` (indices within each frame) one massive dimension: a forward hook on the
    projector; returns its handle (``handle.remove()`` undoes it)."""

    def hook(module, args, out):
        out = out.clone()
        out[:, tokens, dim] = value
        return out

    return model.projector.register_forward_hook(hook)
