"""Vision tower adapters: every tower maps ``(F, 3, S, S)`` pixels to ``(F, N, C)`` patch features on a grid.

Adapters (chosen by ``VisionConfig.kind`` through the explicit ``VISION_TOWERS`` dict):

- ``open_clip``: open_clip's ``VisionTransformer`` built from a tiny config (no weights are downloaded).
- ``hf_clip`` / ``hf_siglip``: transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` from a config dict;
  LLaVA's feature selection (hidden state ``feature_layer``, class token dropped).
- ``mobilenet_v2``: torchvision's MobileNetV2 ``features`` (the grid before pooling), for ImageNet weights.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.config import VisionConfig


def hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn a transformers model's activation checkpointing on (non-reentrant) or off, with the API its version has
    (``activation_checkpointing_*`` since transformers 5.2x, ``gradient_checkpointing_*`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


class VisionTower(nn.Module):
    """Base class: ``forward(pixels (F,3,S,S)) -> (F, N, C)`` with ``N = grid[0] * grid[1]``."""

    config: VisionConfig
    width: int
    grid: tuple[int, int]
    #: whether the tower's forward calls ``F.linear`` (a ViT does; a CNN does not, and then runs outside the oneDNN
    #: linears' mode, whose interposition on every torch call would cost it ~1 ms per forward for nothing)
    has_linears: bool = True

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:  # pragma: no cover - interface
        """Recompute the tower's activations in backward instead of storing them (training only)."""
        raise NotImplementedError


class OpenClipVisionTower(VisionTower):
    """open_clip ``VisionTransformer`` (class token dropped, tokens after ``ln_post``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.config = config
        self.vit = VisionTransformer(
            image_size=config.image_size, patch_size=config.patch_size, width=config.width,
            layers=config.layers, heads=config.heads, mlp_ratio=config.mlp_ratio, output_dim=config.width)
        self.vit.proj = None  # the pooled projection is unused: keep every parameter on the gradient path
        self.width = config.width
        side = config.image_size // config.patch_size
        self.grid = (side, side)
        self._index = config.feature_layer % config.layers

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """open_clip's own per-block checkpointing (non-reentrant)."""
        self.vit.set_grad_checkpointing(enabled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vit.forward_intermediates(
            pixel_values, indices=[self._index], stop_early=True, normalize_intermediates=True,
            intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]  # (F, N, C), class token already split off


class HFVisionTower(VisionTower):
    """transformers CLIP/SigLIP vision model with LLaVA's feature selection."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        if config.hf_config is None:
            raise ConfigError(f"vision kind {config.kind!r} needs vision.hf_config")
        hf = dict(config.hf_config)
        hf.pop("model_type", None)
        if config.kind == "hf_clip":
            self.model = CLIPVisionModel(CLIPVisionConfig(**hf))
            has_cls = True
        else:
            self.model = SiglipVisionModel(SiglipVisionConfig(**hf))
            has_cls = False
        self.config = config
        vc = self.model.config
        self.width = vc.hidden_size
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self._skip = 1 if (has_cls and config.drop_cls) else 0

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """transformers' per-layer checkpointing (non-reentrant)."""
        hf_checkpointing(self.model, enabled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer]  # (F, [1+]N, C)
        return feats[:, self._skip:]


#: the most bytes of its widest activation (block 2's expansion: 96 channels at half the input's side, 3.5 MB per
#: 192 px float32 frame, 6.3 MB at 256 px) a gradient-free CPU forward of the tower computes at once; more frames go
#: in near-equal chunks, whose activations then stay in the caches instead of streaming from memory. On the project's
#: host (32 MiB L3) 16-36 frames run ~2x as fast as in one forward, at one thread and at two, and chunk sizes of 4-9
#: frames (tiny) or 4-5 (smol's 256 px) were within a few percent of each other (README, "Measured")
CPU_CHUNK_BYTES = 26 * 2**20


class MobileNetV2Tower(VisionTower):
    """torchvision MobileNetV2 ``features`` up to block ``feature_layer``: ``(F, C, h, w)`` -> ``(F, h*w, C)``.

    ``feature_layer`` -1 keeps all 19 blocks (1280 channels, stride 32); 13 keeps ``features[:14]`` (96
    channels, stride 16: a 6 x 6 grid at 96 px, what ``bench/vision_probe.py`` found to learn ShapesWorld
    fastest). The state dict is torchvision's (``features.*`` keys without the prefix, e.g. the ImageNet weights
    of ``model/packaged.py``). BatchNorm always normalizes with its running statistics, in training too (the
    usual frozen-statistics fine-tuning of a pretrained CNN): small batches of synthetic images would
    otherwise overwrite the ImageNet statistics and make training and inference features differ. The
    BatchNorm affine weights still train when the tower does.

    Since every BatchNorm is an affine map of its running statistics, the forward folds each one into the
    convolution before it (:func:`conv_batch_norm`: one convolution, no pass over the activations; differentiable in
    the convolution's and the BatchNorm's parameters alike) and runs in the channels-last memory format, which the
    CPU's oneDNN convolutions (depthwise ones above all) read without reordering: `python bench/vision.py` measures
    it against torchvision's own forward. A float32 (or bf16) CPU forward that wants no gradient (inference, a frozen
    tower) runs each pair and the ReLU6 after it as one oneDNN convolution (:func:`fused_conv_batch_norm`), with
    the folded weights kept until a weight changes (:class:`FoldedPairs`), in chunks of frames
    (:data:`CPU_CHUNK_BYTES`). The state dict is torchvision's, unchanged.
    """

    has_linears = False

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.config = config
        blocks = mobilenet_v2(weights=None).features
        self.features = blocks[: config.feature_layer % len(blocks) + 1]
        self.checkpointing = False
        self.folded = FoldedPairs()
        # channels and grid of the cut from a pass on the meta device: shapes only, wherever the weights are
        meta = {k: torch.empty_like(v, device="meta") for k, v in self.features.state_dict(keep_vars=True).items()}
        probe = torch.func.functional_call(self.features.eval(), meta,
                                           (torch.empty(1, 3, config.image_size, config.image_size, device="meta"),))
        self.width = probe.shape[1]
        self.grid = (probe.shape[2], probe.shape[3])

    def _apply(self, fn, recurse: bool = True) -> "MobileNetV2Tower":
        """``nn.Module``'s hook for ``.to(device or dtype)``, ``.half()`` and the like: the kept folded weights are
        copies of the old tensors (on the old device, in the old dtype), so they are dropped; the next gradient-free
        CPU forward folds again."""
        self.folded = FoldedPairs()
        return super()._apply(fn, recurse)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Each block's activations recomputed in backward (``torch.utils.checkpoint``, non-reentrant); the
        BatchNorm layers use their running statistics, so the recomputation is exact."""
        self.checkpointing = enabled

    def train(self, mode: bool = True) -> "MobileNetV2Tower":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        free = self._gradient_free(pixel_values)
        folded = self.folded if free and fusable(pixel_values, self.features[0][0].weight) else None
        chunks = self._chunks(pixel_values, free)
        if chunks > 1:
            return torch.cat([self._forward(frames, folded) for frames in pixel_values.tensor_split(chunks)])
        return self._forward(pixel_values, folded)

    def _chunks(self, pixel_values: torch.Tensor, gradient_free: Optional[bool] = None) -> int:
        """How many near-equal chunks of frames a forward runs in (:data:`CPU_CHUNK_BYTES`): 1 unless
        :meth:`_gradient_free` (``gradient_free``, if the caller has it)."""
        if not (self._gradient_free(pixel_values) if gradient_free is None else gradient_free):
            return 1
        frame_bytes = 96 * (pixel_values.shape[-1] // 2) * (pixel_values.shape[-2] // 2) * pixel_values.element_size()
        return -(-pixel_values.shape[0] // max(1, CPU_CHUNK_BYTES // frame_bytes))

    def _gradient_free(self, pixel_values: torch.Tensor) -> bool:
        """A CPU forward that autograd does not record (inference, or a frozen tower in training)."""
        return pixel_values.device.type == "cpu" and not (torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _forward(self, pixel_values: torch.Tensor, folded: Optional[FoldedPairs]) -> torch.Tensor:
        x = pixel_values.contiguous(memory_format=torch.channels_last)  # (F, 3, S, S), stored as (F, S, S, 3)
        checkpoint = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in self.features:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(run_folded, block, x, folded, use_reentrant=False)
            else:
                x = run_folded(block, x, folded)
        return x.permute(0, 2, 3, 1).flatten(1, 2)  # (F, C, h, w) -> (F, h*w, C): a view in channels-last


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``(C_out, C_in / groups, k, k)`` and bias ``(C_out,)`` of one convolution computing
    ``norm(conv(x))`` for a BatchNorm in eval mode: with ``s = gamma / sqrt(var + eps)`` the weight is ``W * s`` (per
    output channel) and the bias ``beta + (b - mean) * s``, computed in float32 (or wider) and rounded once to the
    weights' dtype (a bf16 tower's features stay closer to float32's than through the two modules); differentiable
    in the convolution's and the BatchNorm's parameters."""
    dtype = conv.weight.dtype
    wide = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 tower
    scale = norm.weight.to(wide) * torch.rsqrt(norm.running_var.to(wide) + norm.eps)  # (C_out,)
    shift = norm.bias.to(wide) - norm.running_mean.to(wide) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(wide) * scale
    weight = conv.weight.to(wide) * scale[:, None, None, None]  # (C_out, C_in / groups, k, k)
    return weight.to(dtype), shift.to(dtype)


def conv_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))`` for a BatchNorm in eval mode as one convolution (:func:`fold_batch_norm`), from the modules'
    current tensors on every call: gradients reach the convolution and the BatchNorm affine weights as through the
    two modules."""
    weight, bias = fold_batch_norm(conv, norm)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class FoldedPairs:
    """The folded weights of a tower's pairs for its gradient-free forwards, folded again when one of the pair's
    tensors changed (its storage or its version counter moved: an optimizer step, ``load_state_dict``, ``.to()``,
    any in-place write). Folding every pair anew cost ~0.5 ms per forward, a tenth of a one-frame tiny tower's."""

    def __init__(self) -> None:
        self._pairs: dict[nn.Module, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def get(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`fold_batch_norm` of the pair's current tensors (without autograd)."""
        tensors = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        try:
            key = tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
        except RuntimeError:  # a tensor made under inference_mode: no version counter to follow, nothing kept
            with torch.no_grad():
                return fold_batch_norm(conv, norm)
        kept = self._pairs.get(conv)
        if kept is None or kept[0] != key:
            with torch.no_grad():
                kept = (key, *fold_batch_norm(conv, norm))
            self._pairs[conv] = kept
        return kept[1], kept[2]

    def __len__(self) -> int:
        """How many convolutions' folded weights are kept."""
        return len(self._pairs)


def fused_conv_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor,
                          clamp: Optional[tuple[float, float]], folded: FoldedPairs) -> torch.Tensor:
    """``clamp(norm(conv(x)))`` (no clamp for None) as one oneDNN convolution with the bias and the clamp in its
    kernel (``mkldnn._convolution_pointwise``), the weights folded by :func:`fold_batch_norm` and kept in
    ``folded``. Not differentiable: for gradient-free :func:`fusable` forwards only. On CPUs where PyTorch's own
    choice for a 1 x 1 convolution at one thread (a BLAS product) is slow, and with no pass over the activations for
    the ReLU6, the tiny tower's forward took 1.1-1.6x less time at one thread (README, "Measured")."""
    weight, bias = folded.get(conv, norm)
    attr, scalars = ("none", []) if clamp is None else ("hardtanh", list(clamp))
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, attr, scalars, "")


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a gradient-free CPU forward of ``x`` through convolutions with ``weight``'s dtype can run its folded
    pairs as :func:`fused_conv_batch_norm`: float32, or bf16 where oneDNN has bf16 kernels, with oneDNN built in."""
    return (x.dtype == weight.dtype and torch.backends.mkldnn.is_available()
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16
                                              and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


def _clamp(module: Optional[nn.Module]) -> Optional[tuple[float, float]]:
    """The range a ``Hardtanh`` (torchvision's ReLU6) clamps to; None for anything else."""
    return (float(module.min_val), float(module.max_val)) if isinstance(module, nn.Hardtanh) else None


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """A Conv2d then an eval-mode affine BatchNorm2d whose tensors are here: DeepSpeed ZeRO-3 leaves a partitioned
    module's parameters empty until its own forward gathers them, so such a pair runs as its two modules."""
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not norm.training
            and norm.running_var is not None and norm.affine and conv.padding_mode == "zeros"
            and all(t.numel() > 0 for t in (conv.weight, norm.weight, norm.bias)))


def run_folded(module: nn.Module, x: torch.Tensor, folded: Optional[FoldedPairs] = None) -> torch.Tensor:
    """``module(x)`` for torchvision's MobileNetV2 blocks with each Conv2d + eval-mode BatchNorm2d pair of a
    Sequential run by :func:`conv_batch_norm` (given ``folded``, the tower's kept weights for a gradient-free
    :func:`fusable` forward: by :func:`fused_conv_batch_norm`, with the ReLU6 after it); an ``InvertedResidual`` adds
    its input where torchvision's does (``use_res_connect``); any other module is called as it is."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    if isinstance(module, InvertedResidual):
        y = run_folded(module.conv, x, folded)
        return x + y if module.use_res_connect else y
    if not isinstance(module, nn.Sequential):
        return module(x)
    layers = list(module)
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and _foldable(layers[i], layers[i + 1]):
            conv, norm = layers[i], layers[i + 1]
            clamp = _clamp(layers[i + 2]) if i + 2 < len(layers) else None
            if folded is not None and isinstance(conv.padding, tuple):  # the clamp (ReLU6) goes into the kernel
                x = fused_conv_batch_norm(conv, norm, x, clamp, folded)
                i += 2 if clamp is None else 3
            else:
                x = conv_batch_norm(conv, norm, x)
                i += 2
        else:
            x = run_folded(layers[i], x, folded)
            i += 1
    return x


VISION_TOWERS: dict[str, Callable[[VisionConfig], VisionTower]] = {
    "open_clip": OpenClipVisionTower,
    "hf_clip": HFVisionTower,
    "hf_siglip": HFVisionTower,
    "mobilenet_v2": MobileNetV2Tower,
}


def build_vision_tower(config: VisionConfig) -> VisionTower:
    """The adapter named by ``config.kind``.

    Raises:
        ConfigError: an unknown kind, or a config the tower's library rejects.
    """
    from taskmllm.model.config_check import CONFIG_ERRORS

    if config.kind not in VISION_TOWERS:
        raise ConfigError(f"vision.kind {config.kind!r} is not one of {sorted(VISION_TOWERS)}")
    try:
        return VISION_TOWERS[config.kind](config)
    except CONFIG_ERRORS as exc:
        raise ConfigError(f"vision: cannot build a {config.kind} tower from this config: "
                          f"{' '.join(str(exc).split())}") from exc
