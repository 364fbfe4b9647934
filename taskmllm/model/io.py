"""Checkpoints: a directory of ``config.json`` + ``model.safetensors`` + ``tokenizer/`` (never pickle).

Writes are atomic: everything goes to a temporary sibling directory that replaces the target in one rename,
so an interrupted save leaves the previous checkpoint intact. ``import_llava_hf`` converts a local
transformers LLaVA checkpoint (vision tower, projector, language model, tokenizer) into a TaskMLLM.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.config import MLLMConfig, ProjectorConfig, TokenConfig, VisionConfig

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def atomic_directory_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path`` in one rename (old content replaced last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def save_pretrained(model: "TaskMLLM", path: str | Path) -> Path:
    """Save ``model`` to directory ``path`` atomically."""
    from safetensors.torch import save_model

    def write(tmp: Path) -> None:
        model.config.save(tmp / CONFIG_FILE)
        save_model(model, str(tmp / WEIGHTS_FILE))
        model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))

    return atomic_directory_write(path, write)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    bases: Optional[Mapping[str, Callable[..., "TaskMLLM"]]] = None) -> "TaskMLLM":
    """Load a directory written by :func:`save_pretrained`, or an adapter directory (``adapter.json``, see
    :mod:`taskmllm.model.adapter`) whose base ``bases[name](**base_args)`` rebuilds.

    Raises:
        CheckpointError: a missing file, a config of another format version, or corrupt weights;
            the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from taskmllm.model.adapter import ADAPTER_META, load_adapter
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.model.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint directory not found")
    if (path / ADAPTER_META).is_file():
        if not bases:
            raise CheckpointError(path / ADAPTER_META, "an adapter checkpoint: its base model is rebuilt by "
                                  "JointModel.from_pretrained / Pipeline.from_pretrained (or pass bases=)")
        return load_adapter(path, bases).to(device).eval()
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
        if not (path / name).exists():
            raise CheckpointError(path / name, "missing from the checkpoint directory")
    try:
        config = MLLMConfig.load(path / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(path / CONFIG_FILE, str(exc)) from exc
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    model = TaskMLLM(config, tokenizer)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path / WEIGHTS_FILE, f"cannot read weights: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(path / WEIGHTS_FILE, f"weights do not match the config: missing {sorted(missing)[:5]}, "
                                                   f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ llava-hf
def import_llava_hf(src: str | Path, tasks: dict[str, int] | None = None) -> "TaskMLLM":
    """Convert a local transformers LLaVA checkpoint (``LlavaForConditionalGeneration``) to a TaskMLLM.

    The protocol tokens are added to its tokenizer; new embedding rows are initialised to the mean of the
    existing rows. Logits on prompts without new tokens equal transformers' own forward.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.model.tokenizer import add_protocol_tokens

    src = Path(src)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(src / CONFIG_FILE, "not a transformers checkpoint directory")
    llava = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True, dtype=torch.float32)
    cfg = llava.config
    if cfg.projector_hidden_act != "gelu":
        raise ConfigError(f"projector activation {cfg.projector_hidden_act!r} is not supported (LLaVA uses gelu)")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ConfigError("a list of vision_feature_layer values is not supported; use one layer")
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    add_protocol_tokens(tokenizer)
    vcfg = cfg.vision_config
    kinds = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
    if vcfg.model_type not in kinds:
        raise ConfigError(f"vision tower {vcfg.model_type!r} is not supported; expected one of {sorted(kinds)}")
    vision = VisionConfig(kind=kinds[vcfg.model_type], image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                          width=vcfg.hidden_size, hf_config=vcfg.to_dict(), feature_layer=cfg.vision_feature_layer,
                          drop_cls=cfg.vision_feature_select_strategy == "default")
    llm = AutoModelForCausalLM.from_config(cfg.text_config)
    llm.get_decoder().load_state_dict(llava.model.language_model.state_dict())
    llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config = MLLMConfig(vision=vision, projector=ProjectorConfig(bias=getattr(cfg, "multimodal_projector_bias", True)),
                        llm=llm.config.to_diff_dict() | {"model_type": llm.config.model_type},
                        tokens=TokenConfig(tasks=tasks or {"seg": 1, "det": 4, "track": 1}))
    model = TaskMLLM(config, tokenizer, llm=llm)
    model.vision.model.load_state_dict(llava.model.vision_tower.state_dict())
    model.projector.load_state_dict(llava.model.multi_modal_projector.state_dict(), strict=False)
    return model.eval()
