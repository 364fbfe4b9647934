"""QueryProjection's optional per-dimension standardization (``DecoderOptions.query_norm``)."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.experts import build_expert, default_spec
from taskmllm.experts.common import QueryProjection


def _skewed(n: int, h: int = 16) -> torch.Tensor:
    """States whose variance sits in two dimensions (as a pretrained LLM's last states)."""
    x = torch.randn(n, 4, h)
    x[..., :2] = x[..., :2] * 50 + 20
    return x


def test_batch_norm_standardizes_each_dimension_in_training_and_uses_running_stats_in_eval():
    torch.manual_seed(0)
    proj = QueryProjection(16, 8, norm="batch").train()
    x = _skewed(6)
    flat = x.reshape(-1, 16)
    by_hand = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)  # BatchNorm1d, no affine
    torch.testing.assert_close(proj(x), proj.net(by_hand.reshape(x.shape)))
    # running statistics moved by momentum 0.1 from (0, 1) towards the batch's
    torch.testing.assert_close(proj.norm.running_mean, 0.1 * flat.mean(0))
    proj.eval()
    want = (x - proj.norm.running_mean) / torch.sqrt(proj.norm.running_var + 1e-5)
    torch.testing.assert_close(proj(x), proj.net(want))


def test_a_single_state_in_training_uses_the_running_statistics():
    proj = QueryProjection(16, 8, norm="batch").train()
    x = _skewed(1)[:, :1]  # (1, 1, H): one call, one query
    before = proj.norm.running_mean.clone()
    torch.testing.assert_close(proj(x), proj.net(x / torch.sqrt(torch.ones(16) + 1e-5)))
    torch.testing.assert_close(proj.norm.running_mean, before)
    assert proj(torch.zeros(0, 4, 16)).shape == (0, 4, 8)  # a placeholder run with no call


def test_none_is_the_plain_projection_and_keeps_old_checkpoints_loadable():
    torch.manual_seed(0)
    plain = QueryProjection(16, 8)
    assert plain.norm is None and set(plain.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                                                "net.2.bias"}
    expert = build_expert("det", default_spec("det", 16, 8, (4, 4), 64, num_queries=2, dim=32, query_norm="batch"))
    assert {"query_proj.norm.running_mean", "query_proj.norm.running_var"} <= set(expert.state_dict())


def test_an_unknown_query_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="query_norm must be one of"):
        build_expert("seg", default_spec("seg", 16, 8, (4, 4), 64, query_norm="layer"))
