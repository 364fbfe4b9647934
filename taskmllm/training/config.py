"""Typed training configuration: dataclasses, a strict YAML loader and ``--a.b=c`` overrides.

A stage YAML is a :class:`TrainConfig` written out. ``inherit: other.yaml`` (relative to the file) merges the
other file underneath first, so a recipe keeps its shared settings in one ``_base.yaml``. Every key is
checked: an unknown key raises :class:`ConfigError` naming the closest known key, a value of the wrong type
raises :class:`ConfigError` naming its path. The resolved config is written beside every checkpoint
(``train_config.yaml``) and loads back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from taskmllm.errors import ConfigError

MODES = ("frozen", "lora", "full")
COMPONENTS = ("vision", "projector", "llm", "queries", "experts", "patch_head", "focus_head", "attr_head")
DATA_SOURCES = ("shapesworld", "llava")


@dataclass
class LoraSettings:
    """peft LoRA on every linear layer of a ``lora`` component (TPO: r16, alpha 32, dropout 0.1, + lm_head)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    lm_head: bool = True


@dataclass
class StageConfig:
    """A training stage as data.

    Attributes:
        name: stage name (``pretrain``, ``align``, ``assign``, ``heads``, ``joint``).
        trainable: component -> ``frozen | lora | full``. Components: ``vision``, ``projector``, ``llm``,
            ``queries``, ``experts`` (every expert), ``experts.<name>`` (one expert; overrides ``experts``),
            ``patch_head`` (the dense per-patch head of ``pretrain``), ``focus_head`` (the focus loss's head),
            ``attr_head`` (the attribute loss's head). Unlisted components are frozen.
        lora: LoRA settings of the ``lora`` components.
        lm_weight: weight of the LM cross-entropy.
        expert_weights: per-expert weight on the sum of that expert's (already weighted) loss terms.
        patch_weight: weight of the dense per-patch shape/color loss on the vision tokens (0 = off).
        focus_weight: weight of the focus loss (0 = off): after ``focus_layer`` LLM blocks, each visual token
            says whether it shows what the question names (:class:`~taskmllm.training.losses.FocusHead`;
            ShapesWorld data; name ``focus_head: full`` in ``trainable``).
        focus_layer: after how many LLM blocks the focus (and the attributes) are read.
        attr_weight: weight of the attribute loss (0 = off): after ``focus_layer`` LLM blocks, linear shape and
            color classifiers on each visual token name the object it shows (background = class 0), so the
            color an answer needs is linear where attention reads it (ShapesWorld data; ``attr_head: full``).
        detach_context: experts whose loss does not train the LLM through the visual-token states they read
            (``llm_context``): their gradient reaches the LLM only through their task queries, as in TPO. The
            visual tokens are what VQA answers read, and the experts' pull on them costs answer accuracy.
    """

    name: str = "stage"
    trainable: dict[str, str] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    lm_weight: float = 1.0
    expert_weights: dict[str, float] = field(default_factory=dict)
    patch_weight: float = 0.0
    focus_weight: float = 0.0
    focus_layer: int = 1
    attr_weight: float = 0.0
    detach_context: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Where the model comes from: ``init: tiny`` or ``init: smol`` builds that recipe fresh (with the
    overrides below, e.g. ``projector: {pool: 2}``; see ``taskmllm.recipes.BUILDERS``), anything else is a
    :class:`~taskmllm.router.joint.JointModel` directory (a stage's ``final/``). ``experts``: options of the
    fresh experts by task name (e.g. ``{det: {box_head: localizing}}``; each expert's ``Options`` checks them)."""

    init: str = "tiny"
    llm: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_frames: int = 8


@dataclass
class DataConfig:
    """Training data: ShapesWorld on the fly (``mix`` of tasks) or a LLaVA conversation JSON at ``path``.

    ``world``: ShapesWorld scene overrides, any :class:`~taskmllm.data.shapesworld.WorldConfig` field but
    ``image_size`` / ``num_frames`` (set above), e.g. ``{max_objects: 1}`` for a stage on one-object scenes."""

    source: str = "shapesworld"
    path: str = ""
    image_root: str = ""
    mix: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "exist": 1.0, "seg": 1.0})
    length: int = 100_000
    seed: int = 0
    split: str = "train"
    image_size: int = 128
    num_frames: int = 8
    batch_size: int = 8
    world: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with linear warmup down to ``min_lr_ratio * lr``; global-norm clipping.

    ``token_lr``: the learning rate of the protocol tokens' embedding rows when the LLM trains through LoRA
    (peft's trainable token rows; None: ``lr``). Those few rows start from the vocabulary's mean and must move
    far for a pretrained LLM to emit them, so they want a larger rate than the low-rank updates."""

    lr: float = 2e-5
    token_lr: Optional[float] = None
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """One training run (one stage). ``resume``: ``auto`` (latest checkpoint in ``out_dir`` if any),
    ``none``, or a checkpoint directory. ``deepspeed``: a ZeRO JSON path (empty = plain torch)."""

    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/train"
    max_steps: int = 100
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    resume: str = "auto"
    deepspeed: str = ""
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Value checks that need no I/O (paths are checked by :func:`check_paths`)."""
        for key, mode in self.stage.trainable.items():
            base = key.split(".", 1)[0]
            if base not in COMPONENTS or (base != "experts" and "." in key):
                raise ConfigError(f"stage.trainable: unknown component {key!r}{_suggest(base, COMPONENTS)}; "
                                  f"known: {', '.join(COMPONENTS)} and experts.<name>")
            if mode not in MODES:
                raise ConfigError(f"stage.trainable.{key}: mode {mode!r} is not one of {MODES}")
        if not any(m != "frozen" for m in self.stage.trainable.values()):
            raise ConfigError(f"stage {self.stage.name!r} freezes every component: nothing would train")
        world_config(self.data)
        if self.data.source not in DATA_SOURCES:
            raise ConfigError(f"data.source {self.data.source!r}{_suggest(self.data.source, DATA_SOURCES)}; "
                              f"known: {DATA_SOURCES}")
        for name, value in (("max_steps", self.max_steps), ("grad_accum", self.grad_accum),
                            ("save_every", self.save_every), ("keep_last", self.keep_last),
                            ("data.batch_size", self.data.batch_size), ("data.length", self.data.length)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.optim.lr <= 0 or not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError("optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")


def world_config(data: DataConfig):
    """The :class:`~taskmllm.data.shapesworld.WorldConfig` of ``data`` (``image_size``, ``num_frames``, ``world``).

    Raises:
        ConfigError: an unknown ``data.world`` key (with the closest match), ``image_size`` / ``num_frames``
            given there, or a value ``WorldConfig`` rejects.
    """
    from taskmllm.data.shapesworld import WorldConfig

    known = [f.name for f in dataclasses.fields(WorldConfig) if f.name not in ("image_size", "num_frames")]
    for key in data.world:
        if key in ("image_size", "num_frames"):
            raise ConfigError(f"data.world.{key}: set data.{key} instead")
        if key not in known:
            raise ConfigError(f"data.world: unknown key {key!r}{_suggest(key, known)}; known: {', '.join(known)}")
    world = {k: _tuples(v) for k, v in data.world.items()}
    try:
        return WorldConfig(image_size=data.image_size, num_frames=data.num_frames, **world)
    except (ConfigError, TypeError, ValueError) as err:  # TypeError: a value of the wrong type (max_objects: "a")
        raise ConfigError(f"data.world: {err}") from err


def _tuples(value: Any) -> Any:
    """YAML lists -> tuples (WorldConfig's sequence fields are tuples, nested for pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def check_paths(cfg: TrainConfig) -> None:
    """Every path the run reads must exist: raise :class:`ConfigError` before any compute starts."""
    if cfg.data.source != "shapesworld":
        if not cfg.data.path or not Path(cfg.data.path).is_file():
            raise ConfigError(f"data.path: {cfg.data.path!r} does not exist (data.source={cfg.data.source})")
        if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
            raise ConfigError(f"data.image_root: {cfg.data.image_root!r} is not a directory")
    from taskmllm.recipes import BUILDERS

    if cfg.model.init not in BUILDERS and not Path(cfg.model.init).is_dir():
        raise ConfigError(f"model.init: {cfg.model.init!r} is neither a recipe ({', '.join(BUILDERS)}) nor an "
                          "existing model directory (run the previous stage first)")
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise ConfigError(f"deepspeed: config {cfg.deepspeed!r} does not exist")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume: checkpoint {cfg.resume!r} does not exist")


# ------------------------------------------------------------------------------------------- loading
def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a stage YAML (following ``inherit``), apply ``--a.b=c`` overrides, type-check, validate."""
    path = Path(path)
    raw = _read_yaml(path, seen=())
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key.split("."), value)
    if isinstance(raw.get("deepspeed"), str) and raw["deepspeed"] and not Path(raw["deepspeed"]).is_absolute():
        candidate = path.parent / raw["deepspeed"]  # a recipe's ds_zero2.json sits beside its YAMLs
        raw["deepspeed"] = str(candidate) if candidate.exists() else raw["deepspeed"]
    cfg = from_dict(TrainConfig, raw, "")
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``--a.b=c`` (or ``a.b=c``) -> ``("a.b", yaml value of c)``."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text or not text.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} is not of the form --a.b=value")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (loads back with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _read_yaml(path: Path, seen: tuple) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    return _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    """Set ``raw[k0][k1]...``; inside a dict-typed field the rest of the path is one key (``experts.seg``)."""
    node: Any = raw
    cls: Any = TrainConfig
    for i, key in enumerate(keys[:-1]):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if key in hints and typing.get_origin(hints[key]) is dict:
            node = node.setdefault(key, {})
            node[".".join(keys[i + 1:])] = value
            return
        cls = hints.get(key)
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key!r} is not a section")
    node[keys[-1]] = value


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path!r}{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # pragma: no cover - programming error
