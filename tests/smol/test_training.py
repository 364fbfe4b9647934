"""Two steps of each smol stage (align -> see -> heads -> joint -> experts), chained through each stage's ``final/``, from the
recipe YAMLs with a small batch: the real pretrained weights, the real stage settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import taskmllm
from tests.smol.conftest import require_smol_packages

require_smol_packages()

RECIPE = Path(taskmllm.__file__).parent / "training" / "recipes" / "smol"
SMALL = ["--max_steps=2", "--save_every=2", "--data.batch_size=2", "--model.max_frames=2", "--data.sources.shapes.num_frames=2",
         "--optim.warmup_steps=1", "--progress=false"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Run align, see, heads and joint for two steps each; yields ``{stage: (config, out_dir)}``."""
    from taskmllm.training.config import load_config
    from taskmllm.training.train import train

    root = tmp_path_factory.mktemp("smol")
    done, init = {}, None
    for stage in ("align", "see", "heads", "joint", "experts"):
        extra = [f"--out_dir={root / stage}"] + ([f"--model.init={init}"] if init else [])
        if stage == "experts":  # the calls of 16 scenes cached (every expert has some), 2 steps of 2 cached calls
            extra += ["--stage.cached_calls=16", "--log_every=1"]
        cfg = load_config(RECIPE / f"{stage}.yaml", SMALL + extra)
        init = train(cfg)
        done[stage] = (cfg, root / stage)
    yield done
    shutil.rmtree(root)  # ~1 GB per stage (fp32 SmolLM2 in each checkpoint and final/)


@pytest.mark.parametrize("stage", ["align", "see", "heads", "joint", "experts"])
def test_two_steps_of_each_stage(stages, stage):
    cfg, out = stages[stage]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_weighted"])) and r["loss_weighted"] > 0 for r in rows)
    print(f"{stage}: {rows}")
    trainable = {r["name"]: r for r in json.loads((out / "trainable.json").read_text())}
    assert trainable["vision"]["trainable"] == 0  # MobileNetV2 stays frozen in every smol stage
    assert {n for n, r in trainable.items() if r["trainable"]} == {
        "align": {"projector", "aux.words"},
        "see": {"llm"},  # the projector stays at align's word-like tokens
        "heads": {"queries", "experts.seg", "experts.det", "experts.track"},
        "joint": {"llm", "queries", "experts.seg", "experts.det", "experts.track", "aux.attr"},  # projector frozen
        "experts": {"experts.seg", "experts.det", "experts.track"},
    }[stage]
    assert (out / "final" / "config.json").is_file()


def test_final_model_keeps_the_pretrained_parts(stages, smol_model):
    """After align (projector only) the LLM and the vision tower are bit-identical to the packaged weights."""
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(stages["align"][1] / "final")
    mllm = joint.mllm
    # SmolLM2's ChatML template without its default system turn (align.yaml: model.chat_system: false)
    assert mllm.config.tokens.chat == {**smol_model.config.tokens.chat, "system": ""}
    assert mllm.tokenizer.bos_token is None and len(mllm.tokenizer) == len(smol_model.tokenizer)
    full = smol_model.vision.state_dict()  # the whole tower; the recipe keeps its blocks up to stride 16
    for name, p in mllm.vision.state_dict().items():
        torch.testing.assert_close(p, full[name], rtol=0, atol=0)
    for name, p in smol_model.llm.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:  # new protocol rows are random per build
            torch.testing.assert_close(mllm.llm.state_dict()[name], p, rtol=0, atol=0)
    vocab = 49152
    torch.testing.assert_close(mllm.llm.get_input_embeddings().weight[:vocab],
                               smol_model.llm.get_input_embeddings().weight[:vocab], rtol=0, atol=0)


def test_recipe_tower_is_torchvisions_mobilenet_cut_at_stride_16(stages):
    """align.yaml's tower: torchvision's ImageNet ``features[:14]`` (oracle), a 12 x 12 x 96 grid at 192 px for
    the experts, pooled 2 x 2 into 36 visual tokens per frame for the LLM, placed before the question."""
    from torchvision.models import mobilenet_v2

    from taskmllm.model.packaged import mobilenet_v2_state_dict
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(stages["align"][1] / "final")
    reference = mobilenet_v2(weights=None)
    reference.load_state_dict(mobilenet_v2_state_dict())
    pixels = torch.rand(2, 3, 192, 192)
    with torch.no_grad():
        ours = joint.mllm.vision(pixels)  # (2, 144, 96)
        theirs = reference.features[:14].eval()(pixels).flatten(2).transpose(1, 2)  # (2, 96, 12, 12) -> (2, 144, 96)
        pooled, grid = joint.mllm.projector.pool(ours, joint.mllm.vision.grid)
    assert joint.mllm.vision.grid == (12, 12) and ours.shape == (2, 144, 96)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert pooled.shape == (2, 36, 96) and grid == (6, 6)
    assert joint.mllm.config.tokens.image_first
    assert joint.experts["det"].spec.options["box_head"] == "localizing"
