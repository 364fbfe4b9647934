"""Explicit precision: ``auto`` resolves once; DeepSpeed gets booleans and never an ``"auto"``; autocast otherwise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from taskmllm.errors import ConfigError
from taskmllm.training.config import load_config
from taskmllm.training.distributed import deepspeed_config
from taskmllm.training.precision import autocast_context, deepspeed_precision, resolve_precision
from taskmllm.training.train import train
from tests.training.helpers import RECIPE, overrides

CPU = torch.device("cpu")


def test_auto_resolves_to_fp32_on_the_cpu_and_fp16_needs_cuda():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("precision, bf16, fp16", [("bf16", True, False), ("fp16", False, True),
                                                   ("fp32", False, False)])
def test_deepspeed_gets_booleans(precision, bf16, fp16):
    ds = deepspeed_precision({"fp16": {"enabled": "auto", "loss_scale_window": 500}, "bf16": {"enabled": "auto"}},
                             precision)
    assert ds["bf16"] == {"enabled": bf16}
    assert ds["fp16"] == {"enabled": fp16, "loss_scale_window": 500}  # the section's other settings kept


def test_an_auto_value_left_for_deepspeed_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size is \"auto\""):
        deepspeed_precision({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "bf16")


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
def test_the_recipes_engine_configs_are_explicit(tmp_path, name):
    cfg = load_config(RECIPE / "joint.yaml", overrides(tmp_path, f"--deepspeed={RECIPE / name}", "--grad_accum=3"))
    ds = deepspeed_config(cfg, "bf16", world=2)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        cfg.data.batch_size, 3, cfg.data.batch_size * 3 * 2)
    assert "auto" not in json.dumps(ds)


def test_autocast_runs_matmuls_in_the_precision_and_fp32_runs_none():
    a = torch.randn(4, 4)
    with autocast_context("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context("fp32", CPU):
        assert (a @ a).dtype == torch.float32
    with autocast_context("bf16", CPU, engine_casts=True):  # DeepSpeed holds bf16 weights itself
        assert (a @ a).dtype == torch.float32


def test_a_bf16_step_on_the_cpu_keeps_fp32_weights(tmp_path):
    """bf16 autocast trains the fp32 weights (the exported model is fp32) with a finite loss."""
    final = train(load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--max_steps=1", "--precision=bf16")))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss_weighted"])
    assert {t.dtype for t in load_file(str(final / "model.safetensors")).values() if t.is_floating_point()} == {
        torch.float32}
