"""Three-turn conversations with the shipped ``smol`` about one photo, through ``Pipeline`` and through the demo's
client API: the third answer ("Which fruit do I love eating?") names the fruit the user gave in the first turn,
with a turn about the image between them. None of these turns is in the training replay (its chats include "My
favourite colour is green." / "What is my favourite colour?", so colours are not used here; checked by
``tests/data/test_replay.py``). (``tests/demo/test_chat.py`` holds the mechanics with a tiny
model overfit to conversations.)

What did not work, and why this formulation: a name ("My name is Alice." ... "What is my name?") is not recalled
by the shipped ``smol`` — nor by the untouched SmolLM2-135M-Instruct in transformers
(``test_smollm2.py::test_a_three_turn_chat_matches_transformers_turn_by_turn``): at 135M parameters recalling a
name two turns back is beyond the base model. Measured 2026-12-04 with greedy answers of up to 24 tokens: a fruit
is recalled for 7 of these 7 ("I love eating apples."); "My car is X." / "What colour is my car?" for 6 of 7
colours; "I painted my door X today." for 3 of 7.
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
FRUITS = ["apples", "bananas", "cherries", "grapes", "mangoes", "pears", "plums"]
TURNS = ["I love eating {fruit}.", "Describe the image in one sentence.", "Which fruit do I love eating?"]
TOKENS = 24


@pytest.fixture(scope="module")
def pipe():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("smol")


def photo() -> np.ndarray:
    from taskmllm.demo.examples import example_file

    return np.asarray(Image.open(example_file(PHOTO)).convert("RGB"))


def test_the_third_answer_names_the_first_turn_s_fruit(pipe):
    """Every fruit's conversation as one ``chat_batch`` per turn (a greedy answer is ``chat``'s alone, tested
    in tests/demo); the third answers name the first turn's fruit for at least 6 of 7 fruits, and never another
    fruit of the list."""
    image = photo()
    conversations: list[list] = [[] for _ in FRUITS]
    for turn in TURNS:
        for fruit, messages in zip(FRUITS, conversations):
            messages.append(("user", turn.format(fruit=fruit)))
        results = pipe.chat_batch([image] * len(FRUITS), conversations, max_new_tokens=TOKENS)
        for messages, result in zip(conversations, results):
            messages.append(("assistant", result.raw_text))
    third = {fruit: result.text.lower() for fruit, result in zip(FRUITS, results)}
    named = [fruit for fruit in FRUITS if fruit in third[fruit]]
    assert len(named) >= 6, third
    wrong = {fruit: text for fruit, text in third.items() if any(f in text for f in FRUITS if f != fruit)}
    assert not wrong, f"a third answer names another conversation's fruit: {wrong}"
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
        for fruit in ("apples", "plums"):
            session = Client(url, verbose=False)
            for turn in TURNS:
                chat, _, record, *_ = session.predict(image=handle_file(str(example_file(PHOTO))), video=None,
                                                      instruction=turn.format(fruit=fruit), max_new_tokens=TOKENS,
                                                      api_name="/answer")
            assert fruit in record["text"].lower(), (fruit, chat)
            assert len(chat) == 6
    finally:
        demo.close()
