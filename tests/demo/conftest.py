"""Fixtures of the demo tests: a tiny checkpoint overfit to answer the bundled examples with task tokens, its
Pipeline (the oracle), and the demo served on a free localhost port."""

from __future__ import annotations

import os

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

# (bundled file, instruction, answer the checkpoint is overfit to) -- a <seg>, a <det>, a <track> and a text answer
TRAIN = [
    ("shapes-seg.png", "Can you segment the bottommost blue object?",
     "Sure, <ref>the bottommost blue object</ref><seg>."),
    ("shapes-det.png", "Find all red stars.", "<ref>red stars</ref><det>."),
    ("shapes-track.gif", "Follow the cyan star through the video.", "<ref>the cyan star</ref><track>."),
    (None, "What is a circle?", "A round shape."),
]
SEG, DET, TRACK, TEXT = TRAIN
#: two three-turn conversations about one picture whose third answer depends only on the first turn
CHAT_PICTURE = "shapes-seg.png"
CHAT = {color: [(f"My favourite colour is {color}.", "Noted."), ("What is a circle?", "A round shape."),
                ("What is my favourite colour?", f"{color.capitalize()}.")] for color in ("red", "blue")}


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visual_of(name):
    """The bundled file decoded with Pillow alone (independent of taskmllm.data.media): an ``(H, W, 3)`` array,
    the GIF's frames (8, the model's frame count), or None."""
    from PIL import Image, ImageSequence

    from taskmllm.demo.examples import example_file

    if name is None:
        return None
    with Image.open(example_file(name)) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    return frames if name.endswith(".gif") else frames[0]


@pytest.fixture(scope="session")
def demo_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A random tiny JointModel whose LLM is overfit (60 AdamW steps) to :data:`TRAIN` and the conversations of
    :data:`CHAT` (every answer supervised, as in multi-turn training); experts stay random.

    ``TASKMLLM_E2E_MODEL=tiny`` (or a checkpoint directory) uses that model instead, for the README's
    screenshot: ``TASKMLLM_E2E_MODEL=tiny TASKMLLM_E2E_SCREENSHOT=docs/demo.png make test-e2e``.
    """
    if os.environ.get("TASKMLLM_E2E_MODEL"):
        from taskmllm.zoo import resolve_checkpoint

        return resolve_checkpoint(os.environ["TASKMLLM_E2E_MODEL"])
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.router.joint import JointModel

    torch.manual_seed(0)
    mllm = TaskMLLM(tiny_config(tokenizer), tokenizer)
    batch = mllm.processor([t[1] for t in TRAIN], [visual_of(t[0]) for t in TRAIN], answers=[t[2] for t in TRAIN])
    chats = mllm.processor.conversations(list(CHAT.values()), [visual_of(CHAT_PICTURE)] * len(CHAT))
    opt = torch.optim.AdamW(mllm.parameters(), lr=3e-3)
    mllm.train()
    for _ in range(60):
        loss = mllm(batch).loss + mllm(chats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    mllm.eval()
    path = tmp_path_factory.mktemp("demo") / "checkpoint"
    JointModel.build(mllm).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_pipeline(demo_checkpoint):
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="session")
def demo_url(demo_pipeline):
    """The demo of :func:`demo_pipeline` served on a free localhost port (the URL)."""
    from taskmllm.demo.app import build_demo, launch
    from taskmllm.demo.handler import DemoOptions

    demo = build_demo(demo_pipeline, DemoOptions(concurrency_limit=2))
    url = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    yield url
    demo.close()


@pytest.fixture
def client(demo_url):
    """A client with its own session: the demo keeps a chat history per session, and each test starts a chat."""
    from gradio_client import Client

    return Client(demo_url, verbose=False)


def oracle(pipe, name, instruction, **kwargs) -> dict:
    """What the Pipeline answers directly (greedy), as the demo's structured answer shows it (no timings)."""
    record = pipe(visual_of(name), instruction, **kwargs).to_dict()
    record.pop("timings")
    return record


def answer_of(record: dict) -> dict:
    """The demo's structured answer without the fields the Pipeline does not return (timings, latency, ...)."""
    return {k: record[k] for k in ("text", "raw_text", "calls")}


def assert_same_answer(got: dict, want: dict) -> None:
    assert answer_of(got) == {k: want[k] for k in ("text", "raw_text", "calls")}
    assert np.isfinite(got["latency"]["total"])
