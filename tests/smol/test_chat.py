"""Three-turn conversations with the shipped ``smol`` about one photo, through ``Pipeline`` and through the demo's
client API: the third answer ("What is my favourite colour?") names the colour the user gave in the first turn,
with an unrelated turn about the image between them. (``tests/demo/test_chat.py`` holds the mechanics with a tiny
model overfit to conversations.)

What did not work, and why this formulation: a name ("My name is Alice." ... "What is my name?") is not recalled
by the shipped ``smol`` — nor by the untouched SmolLM2-135M-Instruct in transformers
(``test_smollm2.py::test_a_three_turn_chat_matches_transformers_turn_by_turn``): at 135M parameters recalling a
name two turns back is beyond the base model. A colour, which ``smol`` was trained to talk about, is recalled.
Measured 2026-12-04 with greedy answers of up to 24 tokens: 6 of these 7 colours named in the third answer (red
is not: "I'm glad you're interested in my favourite colour.").
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taskmllm.zoo import SHIPPED
from tests.smol.conftest import require_smol_packages

require_smol_packages()
if not (SHIPPED["smol"] / "adapter.json").is_file():
    pytest.skip("the smol adapter is not in this install (make train-smol)", allow_module_level=True)

PHOTO = "photo-cat.jpg"
COLORS = ["green", "purple", "blue", "yellow", "pink", "orange", "red"]
TURNS = ["My favourite colour is {color}.", "Describe the image in one sentence.", "What is my favourite colour?"]
TOKENS = 24


@pytest.fixture(scope="module")
def pipe():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("smol")


def photo() -> np.ndarray:
    from taskmllm.demo.examples import example_file

    return np.asarray(Image.open(example_file(PHOTO)).convert("RGB"))


def test_the_third_answer_names_the_first_turn_s_colour(pipe):
    """Every colour's conversation as one ``chat_batch`` per turn (a greedy answer is ``chat``'s alone, tested
    in tests/demo); the third answers name the first turn's colour for at least 6 of 7 colours, and never
    another colour of the list."""
    image = photo()
    conversations: list[list] = [[] for _ in COLORS]
    for turn in TURNS:
        for color, messages in zip(COLORS, conversations):
            messages.append(("user", turn.format(color=color)))
        results = pipe.chat_batch([image] * len(COLORS), conversations, max_new_tokens=TOKENS)
        for messages, result in zip(conversations, results):
            messages.append(("assistant", result.raw_text))
    third = {color: result.text.lower() for color, result in zip(COLORS, results)}
    named = [color for color in COLORS if color in third[color]]
    assert len(named) >= 6, third
    wrong = {color: text for color, text in third.items() if any(c in text for c in COLORS if c != color)}
    assert not wrong, f"a third answer names another conversation's colour: {wrong}"
    alone = pipe.chat(image, conversations[0][:-1], max_new_tokens=TOKENS)
    assert alone.raw_text == conversations[0][-1][1], "the batched conversation answers as chat alone"


def test_the_demo_chat_remembers_the_first_turn(pipe):
    """The same conversation through the demo's client API, one session per colour: the demo keeps the history."""
    from gradio_client import Client, handle_file

    from taskmllm.demo.app import build_demo, launch
    from taskmllm.demo.examples import example_file
    from taskmllm.demo.handler import DemoOptions
    from tests.demo.conftest import free_port

    demo = build_demo(pipe, DemoOptions())
    url = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    try:
        for color in ("green", "purple"):
            session = Client(url, verbose=False)
            for turn in TURNS:
                chat, _, record, *_ = session.predict(image=handle_file(str(example_file(PHOTO))), video=None,
                                                      instruction=turn.format(color=color), max_new_tokens=TOKENS,
                                                      api_name="/answer")
            assert color in record["text"].lower(), (color, chat)
            assert len(chat) == 6
    finally:
        demo.close()
