"""A three-turn conversation with the shipped ``smol`` about one image, through ``Pipeline.chat``: the third
answer needs the first turn. (``tests/demo/test_chat.py`` holds the same through the demo's client API with a
tiny model overfit to conversations.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taskmllm.zoo import SHIPPED
from tests.smol.conftest import require_smol_packages

require_smol_packages()
if not (SHIPPED["smol"] / "adapter.json").is_file():
    pytest.skip("the smol adapter is not in this install (make train-smol)", allow_module_level=True)

#: (first turn's name, the question that needs it); the middle turn is unrelated
NAMES = ["Alice", "Bob"]
TURNS = ["My name is {name}. Please remember it.", "What is the capital of France?", "What is my name?"]


@pytest.mark.skip(reason="the shipped smol does not use the first turn ('What is my name?' -> \"I'm Emily.\" after "
                         "'My name is Alice.'), nor does the untouched SmolLM2-135M-Instruct in transformers itself "
                         "(test_smollm2.py::test_a_three_turn_chat_matches_transformers_turn_by_turn): issue #27 open")
@pytest.mark.parametrize("name", NAMES)
def test_the_third_answer_names_the_first_turn(name):
    from taskmllm.demo.examples import example_file
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("smol")
    image = np.asarray(Image.open(example_file("photo-cat.jpg")).convert("RGB"))
    messages = []
    for turn in TURNS:
        messages.append(("user", turn.format(name=name)))
        result = pipe.chat(image, messages, max_new_tokens=24)
        messages.append(("assistant", result.raw_text))
    assert name.lower() in result.text.lower(), messages
