"""Stage YAML numbers are checked when the config loads: a NaN, a negative or an out-of-range value is a
ConfigError naming the setting and its range, before any model is built."""

from __future__ import annotations

import pytest

from taskmllm.errors import ConfigError
from taskmllm.training.config import check_paths, load_config
from tests.training.helpers import RECIPE


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=.nan", r"optim.lr must be a finite number in \(0, 10\], got nan"),
    ("--optim.lr=0", r"optim.lr must be a finite number in \(0, 10\], got 0.0"),
    ("--optim.token_lr=-1", r"optim.token_lr must be a finite number in \(0, 10\], got -1.0"),
    ("--optim.betas=[2, -1]", r"optim.betas\[0\] must be a finite number in \[0, 1\), got 2.0"),
    ("--optim.betas=[0.9, .nan]", r"optim.betas\[1\] must be a finite number in \[0, 1\), got nan"),
    ("--optim.eps=-1e-8", r"optim.eps must be a finite number in \(0, 1\], got -1e-08"),
    ("--optim.grad_clip=.inf", r"optim.grad_clip must be a finite number > 0, got inf"),
    ("--optim.weight_decay=-0.1", r"optim.weight_decay must be a finite number in \[0, 1000\], got -0.1"),
    ("--optim.min_lr_ratio=2", r"optim.min_lr_ratio must be a finite number in \[0, 1\], got 2.0"),
    ("--optim.warmup_steps=-1", r"optim.warmup_steps must be an integer in \[0, 1000000000\], got -1"),
    ("--stage.lm_weight=.nan", r"stage.lm_weight must be a finite number >= 0, got nan"),
    ("--stage.expert_weights.seg=-1", r"stage.expert_weights.seg must be a finite number >= 0, got -1.0"),
    ("--stage.lora.dropout=1", r"stage.lora.dropout must be a finite number in \[0, 0.999\], got 1.0"),
    ("--data.batch_size=1000000", r"data.batch_size must be an integer in \[1, 4096\], got 1000000"),
    ("--seed=-1", r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
    ("--model.max_frames=0", r"model.max_frames must be an integer in \[1, 1024\], got 0"),
    ("--max_steps=0", r"max_steps must be an integer in \[1, 1000000000\], got 0"),
    ("--data.sources.shapes.mix.seg=-1", r"data.sources.shapes: mix.seg: a weight must be a finite number >= 0, "
                                         r"got -1"),
    ("--data.sources.shapes.weight=-2", r"weight must be a finite number >= 0, got -2"),
])
def test_bad_numbers_are_named_with_their_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE / "pretrain.yaml", [override])


def test_an_all_zero_mix_is_named_not_called_empty():
    overrides = [f"--data.sources.shapes.mix.{task}=0" for task in
                 load_config(RECIPE / "pretrain.yaml").data.sources["shapes"]["mix"]]
    with pytest.raises(ConfigError, match=r"mix: every weight is 0 .*; give at least one task a weight > 0"):
        load_config(RECIPE / "pretrain.yaml", overrides)


def test_yaml_errors_are_one_line_with_the_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage:\n  name: [unclosed\noptim: {lr: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    assert str(info.value) == f"{bad}: invalid YAML at line 3, column 6: expected ',' or ']', but got ':'"
    with pytest.raises(ConfigError, match=r"override '--optim.lr=\[1': cannot parse the value at line 1, column 3: "
                                          r"expected ',' or '\]', but got '<stream end>'"):
        load_config(RECIPE / "pretrain.yaml", ["--optim.lr=[1"])


def test_binary_yaml_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"model.safetensors: not a UTF-8 text file \(byte 0\); a stage config is "
                                          r"YAML"):
        load_config(bad)


def test_device_and_out_dir_are_checked_before_compute(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = load_config(RECIPE / "pretrain.yaml", ["--device=cuda:7", f"--out_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"device 'cuda:7' is not available: this machine has \d+ CUDA device"):
        check_paths(cfg)
    cfg = load_config(RECIPE / "pretrain.yaml", [f"--out_dir={tmp_path}/file/run"])
    with pytest.raises(ConfigError, match=r"out_dir .*/file/run: .*/file is a file, not a directory"):
        check_paths(cfg)
