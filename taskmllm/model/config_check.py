"""Checks of a model config before any module is built: types, sizes, a known ``model_type``, and memory.

Every size must be a positive integer below a bound far above any real model (:data:`LIMITS`), and the whole
model's float32 weights must fit this machine's memory (:func:`check_memory`), so a typo in a ``config.json``
(``vocab_size: 2147483648``, ``hidden_size: -1``, ``image_size: 0``) is a :class:`ConfigError` naming the field
instead of a 2 TB allocation or a crash deep inside torch. The LLM's ``model_type`` is looked up in transformers'
``CONFIG_MAPPING`` and its config object is built (cheap, no weights) — that object is what :func:`check_llm`
returns for :func:`taskmllm.model.mllm.build_llm`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import typing
from typing import TYPE_CHECKING, Any, Mapping, Optional

from taskmllm.errors import ConfigError
from taskmllm.schema import suggest

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.config import MLLMConfig

#: Upper bound of each size a config may name (real models stay far below them).
LIMITS = {
    "vocab_size": 2**21, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "max_position_embeddings": 2**24, "image_size": 4096, "patch_size": 1024, "width": 2**15, "layers": 1024,
    "heads": 1024, "max_frames": 1024, "pool": 64, "num_queries": 256,
}
_TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,31}")
_CHAT_KEYS = ("system", "user_prefix", "assistant_prefix", "answer_sep")


def check_size(where: str, value: Any, key: Optional[str] = None, low: int = 1) -> int:
    """``value`` as an int in ``[low, LIMITS[key]]`` (``key`` defaults to the last part of ``where``)."""
    high = LIMITS[key or where.rsplit(".", 1)[-1]]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in [{low}, {high}], got {value!r} ({type(value).__name__})")
    return int(value)


def check_mllm_config(config: "MLLMConfig") -> None:
    """Every field of ``config`` (vision, projector, tokens, frames, the LLM) and the memory its weights need.

    Raises:
        ConfigError: naming the first bad field.
    """
    vision_params = _check_vision(config.vision)
    check_size("projector.pool", config.projector.pool, "pool")
    check_size("max_frames", config.max_frames)
    _check_tokens(config.tokens)
    llm = check_llm(config.llm)
    check_memory(vision_params + llm_parameters(llm))


def _check_vision(v) -> int:
    """Checks ``VisionConfig`` ``v``; returns an estimate of the tower's parameter count."""
    kinds = typing.get_args(typing.get_type_hints(type(v))["kind"])  # VisionConfig's Literal of tower kinds
    if v.kind not in kinds:
        raise ConfigError(f"vision.kind {v.kind!r} is not one of {sorted(kinds)}")
    size = check_size("vision.image_size", v.image_size)
    for name in ("mean", "std"):
        values = getattr(v, name)
        if (not isinstance(values, (tuple, list)) or len(values) != 3
                or not all(isinstance(x, numbers.Real) and math.isfinite(x) for x in values)):
            raise ConfigError(f"vision.{name} must be 3 finite numbers, got {values!r}")
    if min(v.std) <= 0:
        raise ConfigError(f"vision.std must be > 0, got {v.std!r}")
    if v.kind == "mobilenet_v2":  # feature_layer counts blocks modulo their number, as open_clip's layers
        return 2_300_000
    if v.kind == "open_clip":
        patch = check_size("vision.patch_size", v.patch_size)
        width, layers = check_size("vision.width", v.width), check_size("vision.layers", v.layers)
        heads = check_size("vision.heads", v.heads)
        if patch > size or width % heads:
            raise ConfigError(f"vision: patch_size {patch} must be <= image_size {size} and width {width} a "
                              f"multiple of heads {heads}")
        if not (isinstance(v.mlp_ratio, numbers.Real) and 0 < v.mlp_ratio <= 64):
            raise ConfigError(f"vision.mlp_ratio must be a number in (0, 64], got {v.mlp_ratio!r}")
        return int(layers * width * width * (4 + 2 * v.mlp_ratio))
    return _check_hf_vision(v.hf_config, v.kind)


def _check_hf_vision(hf: Any, kind: str) -> int:
    if not isinstance(hf, Mapping):
        raise ConfigError(f"vision.hf_config: vision kind {kind!r} needs a transformers vision config mapping, "
                          f"got {type(hf).__name__}")
    sizes = {}
    for key, limit_key in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                           ("num_hidden_layers", "num_hidden_layers"), ("num_attention_heads", "num_attention_heads"),
                           ("image_size", "image_size"), ("patch_size", "patch_size")):
        if key in hf:
            sizes[key] = check_size(f"vision.hf_config.{key}", hf[key], limit_key)
    h, layers = sizes.get("hidden_size", 768), sizes.get("num_hidden_layers", 12)
    return layers * (4 * h * h + 2 * h * sizes.get("intermediate_size", 4 * h))


def _check_tokens(tokens) -> None:
    if not isinstance(tokens.tasks, Mapping):
        raise ConfigError(f"tokens.tasks must map task names to query counts, got {tokens.tasks!r}")
    for name, k in tokens.tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            raise ConfigError(f"tokens.tasks: task name {name!r} must be a letter then up to 31 letters, digits, "
                              "'_' or '-'")
        check_size(f"tokens.tasks.{name}", k, "num_queries")
    if not isinstance(tokens.chat, Mapping):
        raise ConfigError(f"tokens.chat must be a mapping, got {tokens.chat!r}")
    for key, value in tokens.chat.items():
        if key not in _CHAT_KEYS or not isinstance(value, str):
            raise ConfigError(f"tokens.chat.{key}: the chat template has the string fields {list(_CHAT_KEYS)}, "
                              f"got {key!r}: {value!r}")


def check_llm(llm: Any, where: str = "llm"):
    """The transformers config object of the config dict ``llm`` (``model_type`` + fields), checked.

    Raises:
        ConfigError: no ``model_type``, one transformers does not know as a causal LM, a field transformers
            rejects, or a size outside :data:`LIMITS`.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(llm, Mapping):
        raise ConfigError(f"{where} must be a transformers config mapping, got {type(llm).__name__}")
    fields = dict(llm)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{where} config needs a 'model_type' (e.g. 'llama')")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}.model_type {model_type!r} is not a causal language model transformers knows"
                          f"{suggest(str(model_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))}")
    for key in _LLM_KEYS:  # before transformers sees them: its own checks do not bound sizes
        if fields.get(key) is not None:
            check_size(f"{where}.{key}", fields[key], key)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except CONFIG_ERRORS as exc:
        raise ConfigError(f"{where}: transformers rejects this {model_type} config: "
                          f"{' '.join(str(exc).split())}") from exc
    for key in _LLM_KEYS:  # the same sizes under the model type's own names (gpt2: n_embd, ...)
        value = getattr(config, key, None)
        if value is not None:
            check_size(f"{where}.{key}", value, key)
    _check_token_ids(config, where)
    return config


def _check_token_ids(config, where: str) -> None:
    """``pad/bos/eos_token_id``: None, or ids (an int, or a list for ``eos``) inside the vocabulary."""
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        for token in ids:
            if token is None:
                continue
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < (vocab or 2**63):
                raise ConfigError(f"{where}.{key} must be a token id in [0, vocab_size {vocab}), got {value!r}")


_LLM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")


def _config_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (TypeError, ValueError, KeyError, AttributeError)
    try:  # transformers >= 5 validates fields with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return errors
    return errors + (StrictDataclassError,)


#: What transformers (and the towers' libraries) raise for a config they reject.
CONFIG_ERRORS = _config_errors()


def llm_parameters(config) -> int:
    """Estimated parameter count of a decoder LM from its transformers config (embeddings + blocks)."""
    h = int(getattr(config, "hidden_size", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return vocab * h * (1 if tied else 2) + layers * (4 * h * h + 3 * h * inter)


def check_memory(parameters: int, bytes_per_parameter: int = 4) -> None:
    """:class:`ConfigError` when ``parameters`` float32 weights exceed this machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return
    need = parameters * bytes_per_parameter
    if need > total:
        raise ConfigError(f"the config describes a model of about {parameters / 1e9:.1f} billion parameters "
                          f"({need / 2**30:.0f} GiB in float32), more than this machine's {total / 2**30:.0f} GiB "
                          "of memory; check its sizes")
