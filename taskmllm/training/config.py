"""Typed training configuration: dataclasses, a strict YAML loader and ``--a.b=c`` overrides.

A stage YAML is a :class:`TrainConfig` written out. ``inherit: other.yaml`` (relative to the file) merges the
other file underneath first, so a recipe keeps its shared settings in one ``_base.yaml``. Every key is
checked: an unknown key raises :class:`ConfigError` naming the closest known key, a value of the wrong type
raises :class:`ConfigError` naming its path. The resolved config is written beside every checkpoint
(``train_config.yaml``) and loads back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from taskmllm.errors import ConfigError
from taskmllm.schema import from_dict, suggest, to_dict

MODES = ("frozen", "lora", "full")
COMPONENTS = ("vision", "projector", "llm", "queries", "experts", "aux")


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
            ``queries``, ``experts`` (every expert), ``experts.<name>`` (one expert; overrides ``experts``).
            Unlisted components are frozen; the stage's auxiliary heads (``aux``) always train.
        lora: LoRA settings of the ``lora`` components.
        lm_weight: weight of the LM cross-entropy.
        expert_weights: per-expert weight on the sum of that expert's (already weighted) loss terms.
        aux: auxiliary losses by name with their options (``{focus: {weight: 1.0, layer: 1}}``; the names and
            options of ``taskmllm.training.aux.AUX_LOSSES``): training-only heads on the model's states whose
            targets come from the samples' grounded regions.
        detach_context: experts whose loss does not train the LLM through the visual-token states they read
            (``llm_context``): their gradient reaches the LLM only through their task queries, as in TPO. The
            visual tokens are what VQA answers read, and the experts' pull on them costs answer accuracy.
        grad_calibration: ``none`` (the plain sum of the losses' gradients) or ``fuller``: FULLER's multi-task
            gradient calibration (``taskmllm.training.grad_calibration``): the tasks' gradients on the LLM's last
            hidden states lose their conflicting components and are balanced in magnitude; the gradients
            reaching the visual and the text positions of the LLM's input are balanced again.
        cached_calls: 0 (off), or N: a stage that trains the experts alone runs the frozen MLLM once over its
            first N samples (per rank), keeps every expert call's inputs and target, and trains on calls drawn
            from that cache, ``data.batch_size`` per micro-batch: a step then costs the experts only
            (``taskmllm.training.call_cache``).
        cached_calls_dir: where each rank's cache is written (default ``<out_dir>/call_cache``); a resumed run, or
            another run of the same frozen model (by its checksums: any path to the same checkpoint), data and
            count (e.g. other expert options), reads it instead of running the MLLM again (the file records what it
            was built from). A file there built from anything else raises instead of being overwritten. A build
            saves its calls in parts there as it goes, and a killed one resumes at its last part.
    """

    name: str = "stage"
    trainable: dict[str, str] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    lm_weight: float = 1.0
    expert_weights: dict[str, float] = field(default_factory=dict)
    aux: dict[str, dict[str, Any]] = field(default_factory=dict)
    detach_context: list[str] = field(default_factory=list)
    grad_calibration: Literal["none", "fuller"] = "none"
    cached_calls: int = 0
    cached_calls_dir: str = ""


@dataclass
class ModelConfig:
    """Where the model comes from: ``init: tiny`` or ``init: smol`` builds that recipe fresh (with the
    overrides below, e.g. ``projector: {pool: 2}``; see ``taskmllm.zoo.BUILDERS``), anything else is a
    :class:`~taskmllm.router.joint.JointModel` directory (a stage's ``final/``). ``experts``: options of the
    fresh experts by task name (e.g. ``{det: {box_head: localizing}}``; each expert's ``Options`` checks them).
    ``fresh``: parts of a checkpoint's experts, or whole experts, that start from their initialization
    (``["det.center_head"]``: with ``experts: {det: {score_head: match}}`` on a ``center`` checkpoint; ``["seg"]``;
    ``JointModel.set_expert_options``).
    ``gradient_checkpointing``: recompute the LLM's and the vision tower's activations in backward instead of
    storing them (less memory, about a third more compute; the gradients are the same). ``image_first``: a fresh
    model's prompt layout (``tokens.image_first``: the image before the question, LLaVA's, or after it;
    ``repeat_question``: the question on both sides of the image); ``chat_system``: false drops the chat's system
    text (smol: SmolLM2's default system turn, 21 of a ``see`` sample's ~97 tokens; HF's SmolVLM has none)."""

    init: str = "tiny"
    llm: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    max_frames: int = 8
    gradient_checkpointing: bool = False
    image_first: bool = False
    repeat_question: bool = False
    chat_system: bool = True

    def builder_args(self) -> dict[str, Any]:
        """The arguments of ``BUILDERS[init]`` (a fresh recipe model; an adapter's ``base_args``)."""
        return {"max_frames": self.max_frames, "llm": self.llm, "vision": self.vision, "tasks": self.tasks,
                "projector": self.projector, "image_first": self.image_first,
                "repeat_question": self.repeat_question, "chat_system": self.chat_system}


@dataclass
class DataConfig:
    """Training data: named sources mixed by weight, each ``{kind: ..., weight: ..., <the kind's options>}``
    (``taskmllm.data.sources.SOURCE_KINDS``: ``shapesworld``, ``llava``), e.g.
    ``{shapes: {kind: shapesworld, mix: {seg: 2.0}}, chat: {kind: llava, path: conv.json, weight: 0.5}}``.

    ``length``: items per epoch; ``seed``: fixes the data (and ShapesWorld's scenes); ``batch_size``: per rank;
    ``workers``: DataLoader processes that load and tokenize the samples (0: in the training process; the data
    are the same for any number)."""

    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    length: int = 100_000
    seed: int = 0
    batch_size: int = 8
    workers: int = 0

    def specs(self) -> dict:
        """The parsed, typed sources (``taskmllm.data.sources.parse_sources``)."""
        from taskmllm.data.sources import parse_sources

        return parse_sources(self.sources)


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
    ``none``, or a checkpoint directory. ``deepspeed``: a ZeRO JSON path (empty = plain torch, or DDP under
    torchrun). ``precision``: ``auto`` (bf16 on a CUDA device that has it, else fp32), ``fp32``, ``bf16`` or
    ``fp16`` (CUDA; ``taskmllm.training.precision``). ``log_every``: steps per ``metrics.jsonl`` row (each row
    the mean of its steps; reading the values waits for the device, so only then)."""

    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/train"
    max_steps: int = 100
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_every: int = 50
    log_every: int = 1
    keep_last: int = 2
    resume: str = "auto"
    deepspeed: str = ""
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Value checks that need no I/O (paths are checked by :func:`check_paths`)."""
        check_numbers(self)

        for key, mode in self.stage.trainable.items():
            base = key.split(".", 1)[0]
            if base not in COMPONENTS or (base not in ("experts", "aux") and "." in key):
                raise ConfigError(f"stage.trainable: unknown component {key!r}{suggest(base, COMPONENTS)}; "
                                  f"known: {', '.join(COMPONENTS)}, experts.<name> and aux.<name>")
            if mode not in MODES:
                raise ConfigError(f"stage.trainable.{key}: mode {mode!r} is not one of {MODES}")
        if not any(m != "frozen" for m in self.stage.trainable.values()):
            raise ConfigError(f"stage {self.stage.name!r} freezes every component: nothing would train")
        from taskmllm.training.aux import parse_aux  # imports torch: after the cheap checks

        parse_aux(self.stage.aux)
        self.data.specs()
        if self.stage.cached_calls:
            from taskmllm.training.call_cache import check_cacheable

            check_cacheable(self.stage)


#: Integer settings: (dotted name, lowest, highest value).
INT_RANGES = (("max_steps", 1, 10**9), ("grad_accum", 1, 2**16), ("save_every", 1, 10**9), ("keep_last", 1, 10**6),
              ("log_every", 1, 10**9), ("data.workers", 0, 1024),
              ("seed", 0, 2**63 - 1), ("data.batch_size", 1, 4096), ("data.length", 1, 2**31 - 1),
              ("data.seed", 0, 2**63 - 1), ("optim.warmup_steps", 0, 10**9), ("model.max_frames", 1, 1024),
              ("stage.lora.r", 1, 4096), ("stage.cached_calls", 0, 10**8))
#: Float settings: (dotted name, lowest, highest, whether the lowest is excluded); every one must be finite.
FLOAT_RANGES = (("optim.lr", 0.0, 10.0, True), ("optim.weight_decay", 0.0, 1e3, False),
                ("optim.eps", 0.0, 1.0, True), ("optim.min_lr_ratio", 0.0, 1.0, False),
                ("optim.grad_clip", 0.0, math.inf, True), ("stage.lm_weight", 0.0, math.inf, False),
                ("stage.lora.alpha", 0.0, math.inf, True), ("stage.lora.dropout", 0.0, 0.999, False))


def check_numbers(cfg: TrainConfig) -> None:
    """Every numeric setting is finite and in its range (:data:`INT_RANGES`, :data:`FLOAT_RANGES`; ``optim.betas``
    in [0, 1), ``optim.token_lr`` and the expert weights like ``optim.lr`` / ``stage.lm_weight``).

    Raises:
        ConfigError: naming the setting, its range and the value (``optim.lr must be a finite number in (0, 10],
            got nan``).
    """
    for name, low, high in INT_RANGES:
        value = _get(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    floats = [(name, _get(cfg, name), low, high, open_low) for name, low, high, open_low in FLOAT_RANGES]
    for i, beta in enumerate(cfg.optim.betas):
        if not (isinstance(beta, float) and 0.0 <= beta < 1.0):  # NaN fails the comparison too
            raise ConfigError(f"optim.betas[{i}] must be a finite number in [0, 1), got {beta!r}")
    floats += [(f"stage.expert_weights.{k}", w, 0.0, math.inf, False) for k, w in cfg.stage.expert_weights.items()]
    if cfg.optim.token_lr is not None:
        floats.append(("optim.token_lr", cfg.optim.token_lr, 0.0, 10.0, True))
    for name, value, low, high, open_low in floats:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (open_low and value == low) or value > high:
            bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
                f"{'>' if open_low else '>='} {low:g}"
            raise ConfigError(f"{name} must be a finite number {'in ' if math.isfinite(high) else ''}{bounds}, "
                              f"got {value!r}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_paths(cfg: TrainConfig) -> None:
    """Every path the run reads must exist, ``out_dir`` must be writable and ``device`` must exist on this
    machine: raise :class:`ConfigError` before any compute starts."""
    from taskmllm.model.devices import check_device
    from taskmllm.model.io import check_output_dir

    if cfg.device != "auto":
        check_device(cfg.device)
    check_output_dir(cfg.out_dir, "out_dir")
    for name, spec in cfg.data.specs().items():
        try:
            spec.check_files()
        except ConfigError as exc:
            raise ConfigError(f"data.sources.{name}.{exc}") from exc
    from taskmllm.zoo import BUILDERS

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
    # a recipe's ds_zero2.json and data files (e.g. its text replay) sit beside its YAMLs
    if "deepspeed" in raw:
        raw["deepspeed"] = _beside(path, raw["deepspeed"])
    sources = (raw.get("data") or {}).get("sources") if isinstance(raw.get("data"), dict) else None
    for source in (sources or {}).values():
        if isinstance(source, dict) and "path" in source:
            source["path"] = _beside(path, source["path"])
    cfg = from_dict(TrainConfig, raw)
    cfg.validate()
    return cfg


def _beside(config: Path, value: Any) -> Any:
    """A relative file name of a stage YAML: the file beside the YAML when there is one, else as written
    (relative to the working directory)."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    candidate = config.parent / value
    return str(candidate) if candidate.exists() else value


def parse_override(item: str) -> tuple[str, Any]:
    """``--a.b=c`` (or ``a.b=c``) -> ``("a.b", yaml value of c)``."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text or not text.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} is not of the form --a.b=value")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse the value{_yaml_where(exc)}") from exc


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (loads back with :func:`load_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (loads back with :func:`load_config`)."""
    Path(path).write_text(config_yaml(cfg))


def _read_yaml(path: Path, seen: tuple) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit cycle")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); a stage config is YAML") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML{_yaml_where(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    return _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), raw)


def _yaml_where(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: <problem>`` of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    """Set ``raw[k0][k1]...``; in a flat mapping of scalars (``stage.trainable``) the rest of the path is one key
    (``experts.seg``); mappings of mappings (``data.sources.shapes.mix``) are descended."""
    node: Any = raw
    tp: Any = TrainConfig
    for i, key in enumerate(keys[:-1]):
        tp = typing.get_type_hints(tp).get(key, Any) if dataclasses.is_dataclass(tp) else _dict_value(tp)
        if typing.get_origin(tp) is dict and _dict_value(tp) in (str, float, int, bool):
            node = node.setdefault(key, {})  # a flat mapping: the rest of the path is one key (experts.seg)
            node[".".join(keys[i + 1:])] = value
            return
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key!r} is not a section")
    node[keys[-1]] = value


def _dict_value(tp: Any) -> Any:
    """The value type of ``dict[str, X]`` (``Any`` for anything else)."""
    args = typing.get_args(tp)
    return args[1] if typing.get_origin(tp) is dict and len(args) == 2 else Any
