"""Every stage YAML: apply_stage trains exactly the named components, and two steps run on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from taskmllm.training.config import load_config
from taskmllm.training.losses import PatchHead
from taskmllm.training.stages import apply_stage, merge_lora, protocol_token_ids
from taskmllm.training.train import build_joint, train
from tests.training.helpers import RECIPE, STAGES, overrides


@pytest.mark.parametrize("stage", STAGES)
def test_apply_stage_trains_exactly_the_named_components(stage, tmp_path):
    cfg = load_config(RECIPE / f"{stage}.yaml", overrides(tmp_path))
    joint = build_joint(cfg)
    aux = torch.nn.ModuleDict({"patch_head": PatchHead(joint.mllm.vision.width)} if cfg.stage.patch_weight else {})
    report = {r.name: r for r in apply_stage(joint, cfg.stage, aux, protocol_token_ids(joint.mllm.tokenizer))}
    named = cfg.stage.trainable
    for name, r in report.items():
        want = named.get(name, named.get("experts", "frozen") if name.startswith("experts.") else "frozen")
        assert r.mode == want, name
        assert (r.trainable > 0) == (want != "frozen"), f"{stage}: {name} ({want}) has {r.trainable} trainable"
        if want == "lora":
            assert r.trainable < r.total
        if want == "full":
            assert r.trainable == r.total
    # requires_grad is set on nothing outside the components
    total = sum(r.trainable for r in report.values())
    assert total == sum(p.numel() for p in list(joint.parameters()) + list(aux.parameters()) if p.requires_grad)
    if named.get("llm") == "lora":  # protocol-token rows train through peft's trainable tokens
        assert any("token_adapter" in n and p.requires_grad for n, p in joint.named_parameters())
        merge_lora(joint, aux)
        assert type(joint.mllm.llm).__name__ == "LlamaForCausalLM"
        assert not any(p.requires_grad is False and "lora" in n for n, p in joint.named_parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_two_training_steps(stage, tmp_path):
    cfg = load_config(RECIPE / f"{stage}.yaml", overrides(tmp_path, "--max_steps=2", "--save_every=2"))
    final = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_weighted"])) for r in rows)
    if cfg.stage.patch_weight:
        assert rows[0]["patch"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    for f in ("model.safetensors", "optimizer.safetensors", "state.json", "train_config.yaml"):
        assert (ckpt / f).is_file()
    saved = yaml.safe_load((ckpt / "train_config.yaml").read_text())
    assert saved["stage"]["name"] == stage and saved["model"]["llm"]["hidden_size"] == 64
    from taskmllm.router.joint import JointModel

    assert isinstance(JointModel.from_pretrained(final), JointModel)
