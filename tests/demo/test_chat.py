"""A conversation, not a single turn: ``Pipeline.chat`` and the demo's chat send the earlier turns about the picture.

The model (``demo_checkpoint``) was overfit to two three-turn conversations about one picture that differ only in
the first turn ("My favourite colour is red/blue."), whose third answer names that colour: the third answer can be
right only if the first turn reaches the model.
"""

from __future__ import annotations

import pytest

from taskmllm.errors import InputError
from taskmllm.router.pipeline import chat_turns
from tests.demo.conftest import CHAT, CHAT_PICTURE, TEXT, visual_of


def conversation(pipe, color: str) -> list:
    """Three turns with ``pipe.chat``, each sent with the model's own earlier answers; the three results."""
    image, messages, results = visual_of(CHAT_PICTURE), [], []
    for question, _ in CHAT[color]:
        messages.append(("user", question))
        results.append(pipe.chat(image, messages))
        messages.append(("assistant", results[-1].raw_text))
    return results


@pytest.mark.parametrize("color", ["red", "blue"])
def test_the_third_answer_depends_on_the_first_turn(demo_pipeline, color):
    """Same picture, same second and third questions: the third answer names the colour of the first turn."""
    results = conversation(demo_pipeline, color)
    assert [r.text for r in results] == [a for _, a in CHAT[color]]


def test_one_user_message_is_a_single_turn(demo_pipeline):
    image = visual_of(CHAT_PICTURE)
    assert demo_pipeline.chat(image, [{"role": "user", "content": TEXT[1]}]).raw_text == \
        demo_pipeline(image, TEXT[1]).raw_text


def test_the_model_reads_the_conversation_as_in_training(demo_pipeline):
    """The ids of a continued conversation are those of the same turns as a training sample up to the last
    answer: the chat template's own text of the history and question (the oracle), tokenized and expanded."""
    from taskmllm.model.tokens import IMAGE

    proc = demo_pipeline.processor
    history, question = [(q, a) for q, a in CHAT["red"][:2]], CHAT["red"][2][0]
    ids, labels = proc.encode_chat(history, question, 1, False)
    eos = proc.tokenizer.eos_token
    first = proc.format_prompt(history[0][0], 1, False)[len(proc.chat.system):]  # the question with <image>
    assert IMAGE in first
    text = proc.chat.prompt(question, [(first.removeprefix(proc.chat.user_prefix)
                                        .removesuffix(proc.chat.assistant_prefix), history[0][1]),
                                       history[1]], eos=eos)
    bos = [proc.tokenizer.bos_token_id] if proc.tokenizer.bos_token_id is not None else []
    want = proc._expand_visual(bos + proc.tokenizer.encode(text, add_special_tokens=False), 1)
    assert ids == want and set(labels) == {-100}
    full, _ = proc.encode_turns(CHAT["red"], 1, False)
    assert full[:len(ids)] == ids  # the training sample of the whole conversation starts the same


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([("assistant", "Hi.")], "message 0 must be a 'user' turn"),
    ([("user", "Hi."), ("user", "Again.")], "message 1 must be a 'assistant' turn"),
    ([("user", "Hi."), ("assistant", "Hello.")], "end with the user's question"),
    ([{"role": "user", "content": None}], "message 0's content must be a string"),
    ("Hi.", "non-empty list"),
])
def test_bad_conversations_are_input_errors(messages, match):
    with pytest.raises(InputError, match=match):
        chat_turns(messages)


def test_the_demo_chat_keeps_its_history(client, demo_url):
    """Three turns through the demo's client API in one session: the third answer names the first turn's colour;
    a new session (a new chat) about the other colour gets the other answer."""
    from gradio_client import Client, handle_file

    from taskmllm.demo.examples import example_file

    for color, session in (("blue", client), ("red", Client(demo_url, verbose=False))):
        for question, answer in CHAT[color]:
            chat, _, record, *_ = session.predict(image=handle_file(str(example_file(CHAT_PICTURE))), video=None,
                                                  instruction=question, api_name="/answer")
            assert record["text"] == answer, (color, question)
        assert len(chat) == 6 and chat[4]["content"][0]["text"] == CHAT[color][2][0] + " [image]"


def test_chat_batch_answers_each_conversation_as_chat_alone(demo_pipeline):
    """Conversations of different lengths (and a text-only one) in one batch: each answer is ``chat``'s alone."""
    image = visual_of(CHAT_PICTURE)
    conversations = [[m for q, a in CHAT["red"][:2] for m in (("user", q), ("assistant", a))]
                     + [("user", CHAT["red"][2][0])],
                     [("user", TEXT[1])],
                     [("user", CHAT["blue"][0][0]), ("assistant", CHAT["blue"][0][1]), ("user", CHAT["blue"][2][0])]]
    visuals = [image, None, image]
    batched = demo_pipeline.chat_batch(visuals, conversations)
    alone = [demo_pipeline.chat(v, m) for v, m in zip(visuals, conversations)]
    assert [r.raw_text for r in batched] == [r.raw_text for r in alone]
    assert [r.text for r in batched][:2] == ["Red.", "A round shape."]
    with pytest.raises(InputError, match="conversation 1: message 0 must be a 'user' turn"):
        demo_pipeline.chat_batch(visuals[:2], [conversations[0], [("assistant", "Hi.")]])
    with pytest.raises(InputError, match="a list of as many visuals"):
        demo_pipeline.chat_batch(visuals, conversations[:2])
