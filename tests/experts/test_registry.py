"""Registry, specs and options: typed errors for bad names and configs; specs survive JSON + safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmllm.errors import ConfigError, RegistryError, TaskMLLMError, UnknownTaskError
from taskmllm.experts import (
    EXPERTS,
    DetectionExpert,
    Expert,
    ExpertSpec,
    SegmentationExpert,
    TrackingExpert,
    VisionFeatures,
    build_expert,
    default_spec,
    register_expert,
)


def test_registry_is_the_explicit_dict():
    assert EXPERTS == {"seg": SegmentationExpert, "det": DetectionExpert, "track": TrackingExpert}
    for name, cls in EXPERTS.items():
        assert cls.name == name


@pytest.mark.parametrize("name, k", [("seg", 1), ("det", 8), ("track", 1)])
def test_build_each_expert_with_its_default_queries(name, k):
    expert = build_expert(name, default_spec(name, hidden_size=32, vision_dim=24, grid=(6, 6), image_size=96))
    assert isinstance(expert, Expert) and isinstance(expert, torch.nn.Module)
    assert expert.name == name and expert.num_queries == k and expert.hidden_size == 32


def test_unknown_task_lists_valid_names():
    spec = default_spec("seg", 32, 24, (6, 6), 96)
    with pytest.raises(UnknownTaskError) as info:
        build_expert("nope", spec)
    message = str(info.value)
    assert "'nope'" in message and "det, seg, track" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, TaskMLLMError)
    with pytest.raises(UnknownTaskError):
        default_spec("nope", 32, 24, (6, 6), 96)


def test_register_twice_is_a_registry_error_and_the_global_registry_is_untouched():
    registry = dict(EXPERTS)
    with pytest.raises(RegistryError, match="already registered as 'seg'"):
        register_expert("seg", SegmentationExpert, registry=registry)

    class PointExpert(SegmentationExpert):
        name = "point"

    register_expert("point", PointExpert, registry=registry)
    assert registry["point"] is PointExpert and "point" not in EXPERTS
    with pytest.raises(RegistryError):
        register_expert("point", PointExpert, registry=registry)
    spec = default_spec("point", 32, 24, (6, 6), 96, registry=registry)
    assert isinstance(build_expert("point", spec, registry=registry), PointExpert)
    with pytest.raises(UnknownTaskError):
        build_expert("point", spec)  # only in the copy


def test_register_rejects_non_experts_and_name_mismatch():
    registry: dict = {}
    with pytest.raises(RegistryError, match="not a subclass"):
        register_expert("mlp", torch.nn.Linear, registry=registry)
    with pytest.raises(RegistryError, match="name is 'seg'"):
        register_expert("mask", SegmentationExpert, registry=registry)
    with pytest.raises(RegistryError, match="identifier"):
        register_expert("<seg>", SegmentationExpert, registry=registry)
    assert registry == {}


def test_spec_json_round_trip():
    spec = default_spec("det", 576, 1280, (7, 7), 112, num_queries=4, dim=32, giou_weight=1.5)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["grid"] == [7, 7] and data["options"] == {"dim": 32, "giou_weight": 1.5}
    assert ExpertSpec.from_dict(data) == spec


@pytest.mark.parametrize(
    "change, match",
    [
        ({"colour": 1}, "unknown key 'ExpertSpec.colour'"),
        ({"num_queries": 0}, r"num_queries must be an int in \[1, 256\], got 0"),
        ({"hidden_size": 2**31}, r"hidden_size must be an int in \[1, 65536\], got 2147483648"),
        ({"hidden_size": 2.5}, "ExpertSpec.hidden_size: expected int, got float 2.5"),
        ({"grid": [6]}, "grid"),
        ({"options": {"dim": [1, 2]}}, r"ExpertSpec.options.dim: expected int \| float \| str \| bool \| NoneType"),
    ],
)
def test_spec_from_dict_rejects_bad_values(change, match):
    data = default_spec("seg", 32, 24, (6, 6), 96).to_dict() | change
    with pytest.raises(ConfigError, match=match):
        ExpertSpec.from_dict(data)


def test_spec_from_dict_rejects_missing_keys():
    data = default_spec("seg", 32, 24, (6, 6), 96).to_dict()
    del data["vision_dim"]
    with pytest.raises(ConfigError, match="ExpertSpec: missing key\\(s\\) 'vision_dim'"):
        ExpertSpec.from_dict(data)


def test_unknown_or_mistyped_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'SegmentationOptions.depht' \(did you mean 'depth'\?\)"):
        build_expert("seg", default_spec("seg", 32, 24, (6, 6), 96, depht=3))
    with pytest.raises(ConfigError, match="DetectionOptions.depth: expected int, got float 2.5"):
        build_expert("det", default_spec("det", 32, 24, (6, 6), 96, depth=2.5))
    expert = build_expert("seg", default_spec("seg", 32, 24, (6, 6), 96, bce_weight=1))
    assert expert.options.bce_weight == 1.0 and isinstance(expert.options.bce_weight, float)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_checkpoint_round_trip_config_json_and_safetensors(name, tmp_path):
    torch.manual_seed(0)
    spec = default_spec(name, 32, 24, (4, 4), 64, dim=32, depth=1)
    expert = build_expert(name, spec).eval()
    folder = tmp_path / "experts" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.to_dict()))
    save_file(expert.state_dict(), str(folder / "model.safetensors"))

    torch.manual_seed(1)  # different init, including SAM's random positional-encoding buffer
    loaded = build_expert(name, ExpertSpec.from_dict(json.loads((folder / "config.json").read_text()))).eval()
    loaded.load_state_dict(load_file(str(folder / "model.safetensors")))
    frames = 3 if name == "track" else 1
    q = torch.randn(2, spec.num_queries, 32)
    feats = VisionFeatures(torch.randn(2, frames, 16, 24), (4, 4), 64)
    a, b = expert(q, feats), loaded(q, feats)
    for key, value in vars(a).items():
        torch.testing.assert_close(getattr(b, key), value)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_impossible_widths_are_config_errors(name):
    with pytest.raises(ConfigError, match="must be divisible"):
        build_expert(name, default_spec(name, 32, 24, (6, 6), 96, dim=36, num_heads=4))
    with pytest.raises(ConfigError, match=r"depth must be in \[1, 16\], got 0"):
        build_expert(name, default_spec(name, 32, 24, (6, 6), 96, depth=0))
    with pytest.raises(ConfigError, match=r"mlp_dim must be in \[1, 8192\], got 1000000"):
        build_expert(name, default_spec(name, 32, 24, (6, 6), 96, mlp_dim=10**6))
