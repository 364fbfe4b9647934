"""Import of a local transformers LLaVA checkpoint (``LlavaForConditionalGeneration``) as a :class:`TaskMLLM`.

The vision tower, projector, language model and tokenizer are taken over unchanged; the protocol tokens and the
task tokens of ``tasks`` are added to the tokenizer, their new embedding rows set to the mean of the existing
rows (TPO). Logits on prompts without new tokens equal transformers' own forward (tested). The prompt layout is
LLaVA's: the image before the question.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.config import MLLMConfig, ProjectorConfig, TokenConfig, VisionConfig
from taskmllm.model.io import CONFIG_FILE
from taskmllm.model.loading import empty_module
from taskmllm.model.mllm import TaskMLLM
from taskmllm.model.vision import build_vision_tower

#: transformers vision model types and the tower adapter that reads each
VISION_KINDS = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}


def check_llava_dir(src: Path) -> dict:
    """``src/config.json`` of a transformers LLaVA checkpoint (``model_type: llava``), read without building
    anything — a taskmllm or any other checkpoint is refused at once instead of being loaded as a default 7B LLaVA.

    Raises:
        CheckpointError: no directory, no or an unreadable ``config.json``, or another model type.
    """
    if not src.is_dir():
        raise CheckpointError(src, "not a directory: give a local transformers LLaVA checkpoint directory")
    file = src / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(file, "missing: not a transformers checkpoint directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(file, f"not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict) or config.get("model_type") != "llava":
        found = config.get("model_type") if isinstance(config, dict) else None
        hint = " (a taskmllm checkpoint: load it with Pipeline.from_pretrained)" if isinstance(config, dict) and \
            "format_version" in config else ""
        raise CheckpointError(file, f"model_type {found!r} is not 'llava': this is not a transformers "
                              f"LlavaForConditionalGeneration checkpoint{hint}")
    return config


def import_llava_hf(src: str | Path, tasks: Optional[Mapping[str, int]] = None) -> TaskMLLM:
    """Convert the LLaVA checkpoint directory ``src``; ``tasks`` (expert name -> K queries) gives it task tokens.

    Raises:
        CheckpointError: ``src`` is not a transformers LLaVA checkpoint directory (checked from its
            ``config.json`` before any weight is read, :func:`check_llava_dir`).
        ConfigError: a LLaVA variant this import does not support (projector activation, several feature layers,
            another vision tower).
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    src = Path(src)
    check_llava_dir(src)
    llava = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True, dtype=torch.float32)
    cfg = llava.config
    if cfg.projector_hidden_act != "gelu":
        raise ConfigError(f"projector activation {cfg.projector_hidden_act!r} is not supported (LLaVA uses gelu)")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ConfigError("a list of vision_feature_layer values is not supported; use one layer")
    vcfg = cfg.vision_config
    if vcfg.model_type not in VISION_KINDS:
        raise ConfigError(f"vision tower {vcfg.model_type!r} is not supported; expected one of {sorted(VISION_KINDS)}")
    vision = VisionConfig(kind=VISION_KINDS[vcfg.model_type], image_size=vcfg.image_size,
                          patch_size=vcfg.patch_size, width=vcfg.hidden_size, hf_config=vcfg.to_dict(),
                          feature_layer=cfg.vision_feature_layer,
                          drop_cls=cfg.vision_feature_select_strategy == "default")
    llm = adopt_language_model(llava)
    config = MLLMConfig(vision=vision, projector=ProjectorConfig(bias=getattr(cfg, "multimodal_projector_bias", True)),
                        llm=llm.config.to_diff_dict() | {"model_type": llm.config.model_type},
                        tokens=TokenConfig(tasks=dict(tasks or {}), image_first=True))
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    tower = empty_module(lambda: build_vision_tower(vision))
    tower.model.load_state_dict(llava.model.vision_tower.state_dict(), assign=True)  # llava's tensors, no copy
    model = TaskMLLM(config, tokenizer, llm=llm, vision=tower)  # adds the protocol and task tokens (mean rows)
    model.projector.load_state_dict(llava.model.multi_modal_projector.state_dict(), strict=False)
    return model.eval()


def adopt_language_model(llava) -> torch.nn.Module:
    """A causal LM holding ``llava``'s language model and LM head: built empty (meta device) and given llava's own
    tensors (``load_state_dict(assign=True)``), so the import never holds two copies of the LLM."""
    from transformers import AutoModelForCausalLM

    llm = empty_module(lambda: AutoModelForCausalLM.from_config(llava.config.text_config))
    llm.get_decoder().load_state_dict(llava.model.language_model.state_dict(), assign=True)
    llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict(), assign=True)
    if getattr(llm.config, "tie_word_embeddings", False):
        llm.tie_weights()
    return llm
