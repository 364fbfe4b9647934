"""MLLMConfig strictness, the <box> codec and the tokenizer's special tokens."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskmllm.errors import BoxFormatError, ConfigError
from taskmllm.model.config import MLLMConfig
from taskmllm.model.tokens import PROTOCOL_TOKENS, decode_boxes, encode_box, find_refs, strip_protocol


def test_config_json_round_trip(tmp_path):
    cfg = MLLMConfig(llm={"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2})
    cfg.vision.width = 48
    cfg.save(tmp_path / "c.json")
    assert MLLMConfig.load(tmp_path / "c.json") == cfg


def test_config_rejects_unknown_key_with_suggestion():
    data = MLLMConfig().to_dict()
    data["vision"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'config.vision.widht' \(did you mean 'width'\?\)"):
        MLLMConfig.from_dict(data)


def test_config_rejects_wrong_type_and_literal():
    data = MLLMConfig().to_dict()
    data["vision"]["layers"] = "four"
    with pytest.raises(ConfigError, match=r"config.vision.layers: expected int"):
        MLLMConfig.from_dict(data)
    data = MLLMConfig().to_dict()
    data["vision"]["kind"] = "resnet"
    with pytest.raises(ConfigError, match="not one of"):
        MLLMConfig.from_dict(data)


def test_config_rejects_other_version(tmp_path):
    data = MLLMConfig().to_dict() | {"format_version": 99}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="format_version 99"):
        MLLMConfig.load(tmp_path / "c.json")


ints = st.integers(0, 999)


@given(st.tuples(ints, ints, ints, ints))
def test_box_text_round_trips_integers(box):
    text = f"<box>{box[0]},{box[1]},{box[2]},{box[3]}</box>"
    assert encode_box(decode_boxes(text)[0]) == text


@given(st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4), st.integers(1, 4000), st.integers(1, 4000))
def test_box_round_trip_within_half_a_step(box, width, height):
    pixels = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    back = decode_boxes(encode_box(pixels, width, height), width, height)[0]
    for got, want, side in zip(back, pixels, (width, height, width, height)):
        assert abs(got - want) <= side / 999 / 2 + 1e-9


@pytest.mark.parametrize("text", ["<box>1,2,3</box>", "<box>1,2,3,1000</box>", "<box>a,b,c,d</box>",
                                  "<box>-1,0,5,5</box>"])
def test_malformed_boxes_raise(text):
    with pytest.raises(BoxFormatError):
        decode_boxes(text)


def test_refs_and_strip():
    text = "Sure, <ref>the red circle</ref><seg><query> and <ref> two stars </ref><det>"
    assert find_refs(text) == ["the red circle", "two stars"]
    assert strip_protocol(text, ["seg", "det"]) == "Sure, the red circle and two stars"
    assert strip_protocol(text, ["seg"]) == "Sure, the red circle and two stars <det>"  # only the model's tasks


def test_tokenizer_keeps_every_special_token_as_one_id(tokenizer):
    for tok in PROTOCOL_TOKENS + ("<s>", "</s>", "<pad>"):
        ids = tokenizer.encode(f"a{tok}b {tok} {tok}{tok}", add_special_tokens=False)
        tid = tokenizer.convert_tokens_to_ids(tok)
        assert ids.count(tid) == 4, tok
        assert tokenizer.encode(tok, add_special_tokens=False) == [tid]
    assert len({tokenizer.convert_tokens_to_ids(t) for t in PROTOCOL_TOKENS}) == len(PROTOCOL_TOKENS)


def test_a_task_token_that_is_not_one_id_is_a_config_error():
    """``add_protocol_tokens`` checks every token it registers: a tokenizer that keeps splitting one fails loudly."""
    from taskmllm.errors import ConfigError
    from taskmllm.model.tokenizer import add_protocol_tokens

    class SplittingTokenizer:  # ignores added tokens, as a tokenizer with a broken added-token table would
        unk_token_id = 0

        def __len__(self) -> int:
            return 10

        def add_special_tokens(self, tokens, replace_extra_special_tokens=False) -> None:
            pass

        def encode(self, text, add_special_tokens=False) -> list[int]:
            return [3] if text in PROTOCOL_TOKENS else [4, 5, 6]

    with pytest.raises(ConfigError, match=r"encodes '<point>' as \[4, 5, 6\], not as one token id"):
        add_protocol_tokens(SplittingTokenizer(), ["point"])


def test_a_new_task_gets_one_new_id_and_a_mean_initialised_row(tokenizer):
    """A model built with a task its tokenizer lacks adds the task token (one id) and, for a pretrained LLM, an
    embedding row equal to the mean of the existing rows (TPO)."""
    import copy

    import torch

    from taskmllm.model.config import TokenConfig
    from taskmllm.model.mllm import TaskMLLM, build_llm
    from tests.conftest import tiny_config

    tok = copy.deepcopy(tokenizer)
    cfg = tiny_config(tok)
    llm = build_llm(cfg.llm)
    rows = llm.get_input_embeddings().weight.detach().clone()
    cfg.tokens = TokenConfig(tasks={"seg": 1, "point": 1})
    model = TaskMLLM(cfg, tok, llm=llm)
    pid = tok.convert_tokens_to_ids("<point>")
    assert pid == rows.shape[0] and tok.encode("<point>", add_special_tokens=False) == [pid]
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == rows.shape[0] + 1 and torch.allclose(emb[pid], rows.mean(0))
    assert model.config.llm["vocab_size"] == rows.shape[0] + 1 and model.task_ids[pid] == "point"
    tok = copy.deepcopy(tokenizer)
    cfg = tiny_config(tok)  # vocab_size = the tokenizer's size before <point>: no row for it
    cfg.tokens = TokenConfig(tasks={"point": 1})
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the LLM's embedding has"):
        TaskMLLM(cfg, tok)
