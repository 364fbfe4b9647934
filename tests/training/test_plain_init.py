"""`model.init` from a plain MLLM checkpoint (what `taskmllm convert llava-hf` writes): fresh experts, task tokens
with TPO's mean-initialised rows, a full checkpoint after saving. Oracles: the converted weights themselves and
transformers' LLaVA."""

from __future__ import annotations

import pytest
import torch

from taskmllm.cli import main
from taskmllm.errors import ConfigError
from taskmllm.model.mllm import TaskMLLM
from taskmllm.model.tokens import PROTOCOL_TOKENS
from taskmllm.router.joint import JointModel
from taskmllm.training.config import TrainConfig
from taskmllm.training.train import build_joint
from tests.training.llava_helpers import plain_tokenizer, save_tiny_llava


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    tok = plain_tokenizer()
    src = save_tiny_llava(root / "llava-hf", tok)
    assert main(["convert", "llava-hf", str(src), str(root / "converted")]) == 0
    return root / "converted", len(tok)


def _cfg(path, **model) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.init = str(path)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_convert_writes_a_plain_mllm_with_grounding_tokens_at_the_mean(converted):
    from transformers import LlavaForConditionalGeneration

    path, llava_vocab = converted
    assert not (path / "experts").exists()
    plain = TaskMLLM.from_pretrained(path)
    assert plain.config.tokens.tasks == {} and len(plain.queries) == 0
    ref = LlavaForConditionalGeneration.from_pretrained(path.parent / "llava-hf", local_files_only=True)
    old = ref.get_input_embeddings().weight
    rows = plain.llm.get_input_embeddings().weight
    new_ids = [plain.tokenizer.convert_tokens_to_ids(t) for t in PROTOCOL_TOKENS if t != "<image>"]
    assert min(new_ids) >= llava_vocab and torch.allclose(rows[:llava_vocab], old)
    assert torch.allclose(rows[new_ids], old.mean(0).expand(len(new_ids), -1), atol=1e-6)
    from taskmllm.router.pipeline import Pipeline

    answer = Pipeline.from_pretrained(path)(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), "Describe the image.",
                                           max_new_tokens=4)  # a plain MLLM answers (no expert needed)
    assert isinstance(answer.text, str) and answer.calls == []


def test_init_adds_fresh_experts_and_task_tokens_at_the_mean(converted, tmp_path):
    path, _ = converted
    plain = TaskMLLM.from_pretrained(path)
    joint = build_joint(_cfg(path, max_frames=4))
    mllm = joint.mllm
    assert sorted(joint.experts) == ["det", "seg", "track"] and mllm.config.max_frames == 4
    assert {n: e.num_queries for n, e in joint.experts.items()} == {"seg": 1, "det": 8, "track": 1}
    known = len(plain.tokenizer)
    ids = [mllm.tokenizer.convert_tokens_to_ids(f"<{t}>") for t in ("seg", "det", "track")]
    assert sorted(ids) == list(range(known, known + 3))
    mean_in = plain.llm.get_input_embeddings().weight.mean(0)
    mean_out = plain.llm.get_output_embeddings().weight.mean(0)
    assert torch.allclose(mllm.llm.get_input_embeddings().weight[ids], mean_in.expand(3, -1), atol=1e-6)
    assert torch.allclose(mllm.llm.get_output_embeddings().weight[ids], mean_out.expand(3, -1), atol=1e-6)
    batch = plain.processor(["What color is the circle?"], [torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()])
    with torch.no_grad():  # the old tokens' logits do not change
        assert torch.allclose(mllm.eval()(batch).logits[..., :known], plain(batch).logits, atol=1e-5)
    joint.save_pretrained(tmp_path / "full")
    again = JointModel.from_pretrained(tmp_path / "full")
    assert sorted(again.experts) == ["det", "seg", "track"]
    want = joint.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items()) and want.keys() == \
        again.state_dict().keys()


def test_init_names_the_experts_and_their_queries(converted):
    path, _ = converted
    joint = build_joint(_cfg(path, tasks={"det": 16}))
    assert list(joint.experts) == ["det"] and joint.experts["det"].num_queries == 16
    joint = build_joint(_cfg(path, experts={"seg": {"bce_weight": 0.5}}))
    assert list(joint.experts) == ["seg"] and joint.experts["seg"].options.bce_weight == 0.5
    with pytest.raises(ConfigError, match=r"\['point'\] are not registered experts"):
        build_joint(_cfg(path, tasks={"point": 1}))
    with pytest.raises(ConfigError, match="override only a fresh recipe model"):
        build_joint(_cfg(path, llm={"hidden_size": 8}))
    with pytest.raises(ConfigError, match="model.image_first"):
        build_joint(_cfg(path, image_first=True))
    with pytest.raises(ConfigError, match="model.repeat_question"):  # a checkpoint keeps its layout
        build_joint(_cfg(path, repeat_question=True))
    with pytest.raises(ConfigError, match="model.chat_system"):
        build_joint(_cfg(path, chat_system=False))
