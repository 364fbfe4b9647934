"""The real workflow end to end, through the CLI only (``taskmllm.cli.main``, in this process to save the start-up
of a new interpreter per command): a tiny random ``LlavaForConditionalGeneration`` on disk -> ``taskmllm convert
llava-hf`` -> ``taskmllm data export`` (refcoco, coco, mot, llava; held-out val files) -> ``taskmllm train`` of
the llava recipe's three stages (a few steps each, overrides on the command line) on the four sources mixed ->
``taskmllm eval --suite refcoco / coco / mot`` on the held-out files -> reports. About a minute on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import taskmllm
from taskmllm.cli import main
from tests.training.llava_helpers import save_tiny_llava

RECIPE = Path(taskmllm.__file__).parent / "training" / "recipes" / "llava"


def _cli(*args) -> None:
    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    _cli("convert", "llava-hf", save_tiny_llava(root / "llava-1.5-hf"), root / "converted")
    data = root / "data"
    small = ["--image-size", 64, "--num-frames", 4]
    for fmt in ("refcoco", "coco", "mot", "llava"):
        _cli("data", "export", "--format", fmt, "--n", 12, *small, data / fmt)
    for fmt in ("refcoco", "coco", "mot"):
        _cli("data", "export", "--format", fmt, "--n", 3, "--split", "val", *small, data / f"{fmt}-val")
    sources = [f"--data.sources.refcoco.path={data}/refcoco/refs.json",
               f"--data.sources.refcoco.instances={data}/refcoco/instances.json",
               f"--data.sources.refcoco.image_root={data}/refcoco/images",
               f"--data.sources.coco.path={data}/coco/annotations/instances_train.json",
               f"--data.sources.coco.image_root={data}/coco/train",
               f"--data.sources.mot.path={data}/mot/train", "--data.sources.mot.stride=1",
               f"--data.sources.chat.path={data}/llava/llava_train.json",
               f"--data.sources.chat.image_root={data}/llava/images"]
    quick = ["--max_steps=2", "--save_every=2", "--data.batch_size=4", "--grad_accum=1", "--precision=fp32",
             "--deepspeed=", "--progress=false", "--model.max_frames=4"]
    init = root / "converted"
    for stage in ("assign", "heads", "joint"):
        _cli("train", RECIPE / f"{stage}.yaml", f"--model.init={init}", f"--out_dir={root / stage}", *quick, *sources)
        init = root / stage / "final"
    common = ["--model", init, "--max-new-tokens", 12, "--no-progress"]
    _cli("eval", "--suite", "refcoco", "--data", data / "refcoco-val/refs.json", "--instances",
         data / "refcoco-val/instances.json", "--image-root", data / "refcoco-val/images", "--n", 4,
         "--out", root / "eval/refcoco", *common)
    _cli("eval", "--suite", "coco", "--data", data / "coco-val/annotations/instances_val.json", "--image-root",
         data / "coco-val/val", "--n", 2, "--out", root / "eval/coco", *common)
    _cli("eval", "--suite", "mot", "--data", data / "mot-val/val", "--n", 4, "--out", root / "eval/mot", *common)
    return root


def test_every_stage_trains_from_the_mixed_files(workflow):
    for stage in ("assign", "heads", "joint"):
        rows = [json.loads(r) for r in (workflow / stage / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["loss_weighted"] > 0 for r in rows), stage
    joint = [json.loads(r) for r in (workflow / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert any("lm" in r for r in joint) and any(k.startswith(("seg_", "det_", "track_")) for r in joint for k in r)
    trainable = {r["name"]: r["mode"] for r in json.loads((workflow / "assign" / "trainable.json").read_text())}
    assert trainable["llm"] == "lora" and trainable["experts.det"] == "frozen"  # TPO's stage 1


def test_the_result_is_a_full_checkpoint(workflow):
    from taskmllm.router.joint import JointModel

    model = JointModel.from_pretrained(workflow / "joint" / "final")
    assert sorted(model.experts) == ["det", "seg", "track"] and model.mllm.config.tokens.image_first
    assert model.mllm.config.max_frames == 4


@pytest.mark.parametrize("suite, tasks, plots", [("refcoco", {"seg", "rec"}, set()),
                                                ("coco", {"det"}, {"detection_pr.png"}),
                                                ("mot", {"track"}, {"tracking_success.png", "tracking_precision.png"})])
def test_reports_are_written(workflow, suite, tasks, plots):
    out = workflow / "eval" / suite
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == suite and set(results["summary"]) == tasks
    assert all(0.0 <= row["routing"] <= 1.0 and row["score"] is not None for row in results["summary"].values())
    assert (out / "results.md").read_text().startswith(f"# taskmllm eval: {suite}")
    assert plots <= {p.name for p in out.glob("*.png")}


def test_the_readme_yaml_example_is_a_valid_stage(tmp_path):
    """The "One YAML" example of README "Fine-tune on your own data" loads as written (from a folder of the
    repository, as its relative paths say)."""
    import re

    from taskmllm.training.config import load_config

    readme = (Path(taskmllm.__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Fine-tune on your own data"):]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "taskmllm").symlink_to(Path(taskmllm.__file__).parent)
    (repo / "configs" / "joint.yaml").write_text(text)
    cfg = load_config(repo / "configs" / "joint.yaml")
    specs = cfg.data.specs()
    assert cfg.stage.name == "joint" and cfg.max_steps == 3000 and cfg.deepspeed.endswith("ds_zero2.json")
    assert Path(cfg.deepspeed).is_file() and cfg.optim.lr == 2e-5 and cfg.stage.lora.r == 16
    assert specs["coco"].mix == {"det": 1.0, "exist": 0.0, "count": 0.5} and specs["mot"].stride == 3
    assert specs["refcoco"].split == "train" and specs["chat"].weight == 2.0


def test_the_recipe_holds_tpos_hyperparameters():
    from taskmllm.training.config import load_config
    from taskmllm.training.recipe_run import load_plan

    assert load_plan("llava").stages == ["assign", "heads", "joint"]
    trainable = {"assign": {"llm": "lora"}, "heads": {"experts": "full", "queries": "full"},
                 "joint": {"llm": "lora", "queries": "full", "experts": "full"}}
    for stage, modes in trainable.items():
        cfg = load_config(RECIPE / f"{stage}.yaml")
        assert cfg.stage.trainable == modes, stage
        assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.weight_decay) == (2e-5, 0.05, 0.02)
        assert cfg.data.batch_size * cfg.grad_accum * 8 == 128 and cfg.precision == "bf16"
        lora = cfg.stage.lora
        assert (lora.r, lora.alpha, lora.dropout, lora.lm_head) == (16, 32, 0.1, True)
        assert json.loads(Path(cfg.deepspeed).read_text())["zero_optimization"]["stage"] == 2
        assert set(cfg.data.specs()) == {"refcoco", "coco", "mot", "chat"}
    assert load_config(RECIPE / "heads.yaml").data.specs()["chat"].weight == 0  # LM weight 0: not read
