"""A checkpoint's config is validated before any module is built: malformed files and sizes are typed errors
naming the field, and nothing allocates from them (a ``vocab_size`` of 2**31 fails in well under a second)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.adapter import ADAPTER_META, write_adapter
from taskmllm.model.config import MLLMConfig
from taskmllm.model.mllm import TaskMLLM
from taskmllm.router.joint import JointModel
from tests.conftest import tiny_config


@pytest.fixture()
def copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")


def _edit_config(path, section, key, value):
    data = json.loads((path / "config.json").read_text())
    (data[section] if section else data)[key] = value
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("section, key, value, message", [
    ("llm", "hidden_size", -1, r"llm.hidden_size must be an integer in \[1, 65536\], got -1 \(int\)"),
    ("llm", "hidden_size", "abc", r"llm.hidden_size must be an integer in \[1, 65536\], got 'abc' \(str\)"),
    ("llm", "vocab_size", 2**31, r"llm.vocab_size must be an integer in \[1, 2097152\], got 2147483648"),
    ("llm", "model_type", "lama", r"llm.model_type 'lama' is not a causal language model transformers knows "
                                  r"\(did you mean 'llama'\?\)"),
    ("llm", "model_type", "bert-fake", r"llm.model_type 'bert-fake' is not a causal language model"),
    ("llm", "num_attention_heads", 3, r"llm: transformers rejects this llama config: .*hidden size \(64\) is not a "
                                      r"multiple of the number of attention heads \(3\)"),
    ("vision", "image_size", 0, r"vision.image_size must be an integer in \[1, 4096\], got 0"),
    ("vision", "std", [0.2, 0.0, 0.2], r"vision.std must be > 0"),
    ("projector", "pool", 0, r"projector.pool must be an integer in \[1, 64\], got 0"),
    (None, "max_frames", 10**6, r"max_frames must be an integer in \[1, 1024\], got 1000000"),
    ("tokens", "tasks", {"seg": 0, "det": 4, "track": 1}, r"tokens.tasks.seg must be an integer in \[1, 256\]"),
])
def test_bad_config_fields_fail_before_any_module_is_built(copy, section, key, value, message):
    _edit_config(copy, section, key, value)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config.json: .*" + message):
        JointModel.from_pretrained(copy)
    assert time.perf_counter() - start < 2.0  # nothing was allocated from the bad sizes


def test_memory_is_checked_against_the_machine():
    from taskmllm.model.config_check import check_memory

    check_memory(1000)
    with pytest.raises(ConfigError, match=r"about 1000.0 billion parameters .* more than this machine's"):
        check_memory(10**12)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", r"config.json: .*not a UTF-8 JSON file"),
    (b"{\"vision\": ", r"config.json: .*not a UTF-8 JSON file \(Expecting value"),
    (b"[1, 2, 3]", r"config.json: .*expected a JSON object"),
])
def test_unreadable_config_json(copy, content, message):
    (copy / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        JointModel.from_pretrained(copy)


def test_garbage_tokenizer_is_named(copy):
    (copy / "tokenizer" / "tokenizer.json").write_text("this is not a tokenizer {")
    with pytest.raises(CheckpointError, match=r"checkpoint/tokenizer: cannot read the tokenizer: JSONDecodeError: "
                                              r"Expecting value"):
        JointModel.from_pretrained(copy)


def test_expert_config_that_does_not_fit_the_model(copy):
    spec = copy / "experts" / "seg" / "config.json"
    data = json.loads(spec.read_text())
    data["hidden_size"] = 2**31
    spec.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"seg/config.json: ExpertSpec.hidden_size must be an int in "
                                              r"\[1, 65536\], got 2147483648"):
        JointModel.from_pretrained(copy)
    data["hidden_size"] = 128
    spec.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"expert 'seg' reads hidden size 128 and vision width 32, the model "
                                              r"has 64 and 32"):
        JointModel.from_pretrained(copy)


@pytest.mark.parametrize("base_args, message", [
    ({"nope": 1}, r"adapter.json: base_args do not fit the 'little' builder: got an unexpected keyword argument "
                  r"'nope'"),
    ({"hidden": -4}, r"adapter.json: base_args: llm.hidden_size must be an integer in \[1, 65536\], got -4"),
    ([1, 2], r"adapter.json: base_args must be a mapping, got \[1, 2\]"),
])
def test_bad_adapter_base_args(tokenizer, tiny_checkpoint, tmp_path, base_args, message):
    def little(hidden: int = 64) -> TaskMLLM:
        cfg = tiny_config(tokenizer)
        cfg.llm["hidden_size"] = hidden
        return TaskMLLM(cfg, tokenizer)

    path = tmp_path / "adapter"
    shutil.copytree(tiny_checkpoint, path, ignore=shutil.ignore_patterns("model.safetensors", "checksums.json"))
    write_adapter(path, {}, "little", {})
    meta = json.loads((path / ADAPTER_META).read_text())
    meta["base_args"] = base_args
    (path / ADAPTER_META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        TaskMLLM.from_pretrained(path, bases={"little": little})


def test_config_objects_are_validated_when_a_model_is_built(tokenizer):
    cfg = tiny_config(tokenizer)
    cfg.vision.width = 33  # not a multiple of its 2 heads
    with pytest.raises(ConfigError, match=r"vision: patch_size 16 must be <= image_size 48 and width 33 a multiple "
                                          r"of heads 2"):
        TaskMLLM(cfg, tokenizer)
    cfg = tiny_config(tokenizer)
    cfg.llm = {"hidden_size": 64}
    with pytest.raises(ConfigError, match=r"llm config needs a 'model_type'"):
        TaskMLLM(cfg, tokenizer)
    data = tiny_config(tokenizer).to_dict()
    data["vision"]["mean"] = [0.5, float("nan"), 0.5]
    with pytest.raises(ConfigError, match=r"vision.mean must be 3 finite numbers"):
        MLLMConfig.from_dict(data)


def test_special_token_ids_must_be_inside_the_vocabulary(copy):
    """Found by fuzzing: a pad id past the vocabulary reached torch's Embedding as an AssertionError."""
    _edit_config(copy, "llm", "pad_token_id", 10**6)
    with pytest.raises(CheckpointError, match=r"llm.pad_token_id must be a token id in \[0, vocab_size \d+\), got "
                                              r"1000000"):
        JointModel.from_pretrained(copy)
