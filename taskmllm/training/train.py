"""One training loop for every stage: ``taskmllm train RECIPE/STAGE.yaml [--a.b=c ...]``.

Read top to bottom: set up (processes and device, precision, config checks, model, stage, optimizer, schedule,
engine, resume, data loader), then a loop of ``grad_accum`` micro-batches through the engine
(``training/distributed.py``: plain torch, DDP or DeepSpeed), an optimizer step, the metrics every ``log_every``
steps (averaged over ranks on the device: nothing in a step waits for the device otherwise) and a checkpoint
every ``save_every`` steps. Launch with ``taskmllm train``, ``torchrun --nproc-per-node N -m taskmllm.cli train ...``
(gloo on CPU, NCCL on GPU) or ``deepspeed``. The data order is a pure function of ``(seed, position)``
(``training/data_loader.py``) so a resumed run sees the next unseen batches; global batch =
``batch_size * grad_accum * world_size``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.training.aux import AuxContext, build_aux
from taskmllm.training.call_cache import CacheParts, CallCache
from taskmllm.training.checkpoint import Checkpointer
from taskmllm.training.config import OptimConfig, TrainConfig, check_paths, config_yaml, save_config
from taskmllm.training.data_loader import Collate, build_loader
from taskmllm.training.distributed import DistContext, Trainer, build_trainer, reduce_mean, setup_distributed
from taskmllm.training.losses import check_expert_names
from taskmllm.training.model_init import check_data_fits
from taskmllm.training.precision import resolve_precision
from taskmllm.training.stages import apply_stage, merge_lora, protocol_token_ids
from taskmllm.training.trainee import LossSettings, Trainee

log = logging.getLogger(__name__)

# metrics.jsonl's clock columns: seconds since the stage started, and this rank's mean time per step blocked on the
# data loader (in-process loading: the loading itself; with workers that keep up: receiving their batches); the other
# columns of identical runs are identical
CLOCK_KEYS = ("time_s", "data_wait_s")


def train(cfg: TrainConfig) -> Path:
    """Run one stage; returns ``<out_dir>/final`` (a JointModel directory the next stage can ``init`` from)."""
    cfg.validate()
    check_paths(cfg)
    ctx = setup_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, ctx.device)
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)

    # ---- model, stage, optimizer, schedule, engine
    specs = cfg.data.specs()
    trainee, report = build_trainee(cfg, specs, ctx.device)
    joint, aux = trainee.joint, trainee.aux
    optimizer = torch.optim.AdamW(param_groups(trainee, cfg.optim), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
    collate = Collate(joint.mllm.processor)
    trainer = build_trainer(trainee, optimizer, scheduler, cfg, precision, ctx, collate)

    # ---- resume (every compatibility check happens here, before the first forward)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last, ctx.rank, ctx.world)
    start_step, position = 0, 0
    resume_from = ckpt.resolve(cfg.resume)
    if resume_from is not None:
        with trainer.gathered(modified=True):  # ZeRO-3: the whole parameters, to check and load them
            state = ckpt.check(resume_from, trainee)
            ckpt.load_module(resume_from, trainee)
        ckpt.load(resume_from, state, None, trainer.optimizer_state, scheduler)
        trainer.loaded()
        start_step, position = state["step"], state["data_position"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    batches = training_batches(cfg, specs, trainee, ctx, position)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_config.yaml")
        (out / "trainable.json").write_text(json.dumps([dataclasses.asdict(r) for r in report], indent=1))
    metrics = MetricsLog(out / "metrics.jsonl", start_step, enabled=ctx.rank == 0)

    # ---- the loop
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=ctx.rank != 0 or not cfg.progress, desc=cfg.stage.name)
    trainee.train()
    meter, t0, waited = Meter(), time.perf_counter(), 0.0
    for step in bar:
        for k in range(cfg.grad_accum):
            asked = time.perf_counter()
            micro = next(batches)
            waited += time.perf_counter() - asked  # this rank's time blocked on the data loader
            parts = trainer.forward_backward(trainer.prepare(micro), last=k == cfg.grad_accum - 1)
            meter.add(parts, 1.0 / cfg.grad_accum)
        position += cfg.grad_accum
        meter.add({"grad_norm": trainer.step()})
        meter.steps += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            wait = round(waited / meter.steps, 4)  # before meter.reduce resets its step count
            row = {"step": step + 1, "lr": scheduler.get_last_lr()[0], "data_wait_s": wait, **meter.reduce(ctx),
                   "time_s": round(time.perf_counter() - t0, 3)}
            waited = 0.0
            row["loss_weighted"] = row.pop("total")
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss_weighted']:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            with trainer.gathered():
                ckpt.save(step + 1, trainee, trainer.optimizer_state, scheduler, position, cfg,
                          partitioned_optimizer=trainer.partitioned_optimizer)
            metrics.plot(out / "loss.png")
    del batches  # stops the loader's workers
    trainer.write_memory(out)
    return export(out, cfg, joint, aux, trainer, ctx)


def training_batches(cfg: TrainConfig, specs: dict, trainee: Trainee, ctx: DistContext, position: int) -> Iterator:
    """This rank's micro-batches from ``position`` on: the data loader's, or with ``stage.cached_calls`` calls
    drawn from a cache the frozen MLLM fills once from the stage's first samples (``training/call_cache.py``)."""
    def loader(start: int) -> Iterator:
        return iter(build_loader(build_dataset(cfg, specs), trainee.joint.mllm.processor, cfg.data.batch_size,
                                 cfg.seed, ctx.rank, ctx.world, start, cfg.data.workers,
                                 pin_memory=ctx.device.type == "cuda"))

    if not cfg.stage.cached_calls:
        return loader(position)
    folder = Path(cfg.stage.cached_calls_dir or Path(cfg.out_dir) / "call_cache")
    path, key = folder / f"rank{ctx.rank}-of-{ctx.world}.safetensors", call_cache_key(cfg, trainee, ctx)
    cache = CallCache.load(path, key)
    if cache is None and cfg.stage.cached_calls_dir and path.is_file():  # never rebuild over a cache given to reuse
        raise ConfigError(f"stage.cached_calls_dir: {path} was built for another model, data, call count or set of "
                          "experts than this stage's; point stage.cached_calls_dir at a new folder (or delete the "
                          "file) to build one")
    if cache is None:  # built from where an interrupted build's saved parts end (none: from the start)
        parts = CacheParts(folder, path.stem, key)
        state = parts.resume()
        source = loader(state.position)
        cache = CallCache.build(trainee.joint, source, cfg.stage.cached_calls, trainee.active,
                                progress=cfg.progress and ctx.rank == 0, parts=parts, state=state)
        del source  # stops the loader's workers
        cache.save(path, key)
        parts.clear()
    if ctx.rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "call_cache.json").write_text(json.dumps(cache.stats, indent=1))
    return cache.batches(cfg.data.batch_size, cfg.seed, position)


def call_cache_key(cfg: TrainConfig, trainee: Trainee, ctx: DistContext) -> str:
    """What a rank's call cache is a function of, hashed: the frozen model (a checkpoint's checksums, else its
    ``init``; a fresh model's builder overrides and seed), the data, the count, the rank's shard and the
    experts' inputs (which read every frame, which read pixels)."""
    init = Path(cfg.model.init)
    sums = init / "checksums.json"
    experts = {t: [trainee.joint.experts[t].video, trainee.joint.experts[t].reads_pixels] for t in trainee.active}
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "workers"}  # workers change no sample
    # a checkpoint is named by its content, so another path to the same files (a link, a copy) finds the cache
    checksums = sums.read_text() if sums.is_file() else None
    fields = {"init": None if checksums else cfg.model.init, "checksums": checksums,
              "builder": cfg.model.builder_args(), "seed": cfg.seed, "data": data, "calls": cfg.stage.cached_calls,
              "rank": ctx.rank, "world": ctx.world, "experts": experts}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def build_trainee(cfg: TrainConfig, specs: dict, device: torch.device) -> tuple[Trainee, list]:
    """The stage's :class:`Trainee` on ``device`` (model, auxiliary losses, trainable components, gradient
    checkpointing) and the table of trainable parameters per component."""
    joint = build_joint(cfg)
    for key in ("expert_weights", "detach_context"):
        check_expert_names(f"stage.{key}", getattr(cfg.stage, key), list(joint.experts))
    check_data_fits(joint, specs)  # every source's tasks, query counts and clip lengths against the model
    aux = build_aux(cfg.stage.aux, aux_context(joint, specs))
    report = apply_stage(joint, cfg.stage, aux, protocol_token_ids(joint.mllm.tokenizer, joint.mllm.config.tokens.tasks))
    if cfg.model.gradient_checkpointing:
        joint.mllm.set_gradient_checkpointing(True)
    settings = LossSettings(cfg.stage.lm_weight, dict(cfg.stage.expert_weights), list(cfg.stage.detach_context),
                            cfg.stage.grad_calibration)
    return Trainee(joint, aux, settings).to(device), report


def export(out: Path, cfg: TrainConfig, joint: nn.Module, aux: nn.ModuleDict, trainer: Trainer,
           ctx: DistContext) -> Path:
    """``<out>/final``: the trained JointModel with LoRA merged (rank 0 writes; ZeRO-3 gathers the weights)."""
    final = out / "final"
    with trainer.gathered():
        trainer.finish()
        if ctx.rank == 0:
            merge_lora(joint, aux)
            joint.save_pretrained(final, extra={"train_config.yaml": config_yaml(cfg)})  # one rename: never without it
    ctx.barrier()
    return final


class Meter:
    """Sums of the logged values since the last log (tensors on the device; read only by :meth:`reduce`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        for k, v in values.items():
            v = v.detach().float() * weight
            self.sums[k] = self.sums[k] + v.to(self.sums[k].device) if k in self.sums else v

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        """Mean per step since the last log, averaged over ranks; resets."""
        values = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return reduce_mean(values, ctx)


# ----------------------------------------------------------------------------------------- pieces
def build_joint(cfg: TrainConfig):
    """A recipe's model built fresh (``model.init: tiny | smol``, with ``model.*`` overrides), a JointModel
    directory (``model.experts`` may then change its experts' loss weights and thresholds), or a plain MLLM
    checkpoint without experts (what ``taskmllm convert`` writes: ``model_init.joint_from_mllm`` adds fresh experts)."""
    from taskmllm.zoo import BUILDERS
    from taskmllm.router.joint import EXPERTS_DIR, JointModel

    mc = cfg.model
    if mc.init not in BUILDERS:
        plain = not (Path(mc.init) / EXPERTS_DIR).is_dir()
        if (mc.llm or mc.vision or mc.projector or mc.image_first or mc.repeat_question or not mc.chat_system
                or (mc.tasks and not plain)):
            raise ConfigError(f"model.llm / model.vision / model.projector / model.image_first / "
                              f"model.repeat_question / model.chat_system override only a "
                              f"fresh recipe model "
                              f"({', '.join(BUILDERS)}); model.tasks also a plain MLLM checkpoint")
        if plain and mc.fresh:
            raise ConfigError(f"model.fresh {mc.fresh} names parts of a checkpoint's experts; {mc.init} has none")
        if plain:
            from taskmllm.training.model_init import joint_from_mllm

            return joint_from_mllm(cfg.model)
        # a checkpoint's experts may change options that keep their parameters (a stage's loss weights)
        return JointModel.from_pretrained(mc.init).set_expert_options(mc.experts, mc.fresh)
    if mc.fresh:
        raise ConfigError(f"model.fresh {mc.fresh}: a fresh {mc.init!r} model's experts all start fresh")
    mllm = BUILDERS[mc.init](**mc.builder_args())
    return JointModel.build(mllm, options=mc.experts)


def build_dataset(cfg: TrainConfig, specs: Optional[dict] = None):
    """The stage's samples: its ``data.sources`` (parsed ``specs`` when given), mixed by weight."""
    from taskmllm.data.sources import build_dataset as build

    return build(cfg.data.specs() if specs is None else specs, cfg.data.length, cfg.data.seed)


def aux_context(joint: nn.Module, specs: dict) -> AuxContext:
    """What the stage's auxiliary losses are built for: the model's widths and depth, the data's classes."""
    from taskmllm.data.sources import label_classes

    mllm = joint.mllm
    return AuxContext(mllm.hidden_size, mllm.vision.width, len(mllm.llm.get_decoder().layers),
                      label_classes(specs), word_vectors=lambda phrases: word_vectors(mllm, phrases),
                      image_first=mllm.config.tokens.image_first and not mllm.config.tokens.repeat_question)


def word_vectors(mllm: nn.Module, phrases: Sequence[str]) -> torch.Tensor:
    """``(P, H)``: the LLM's input embedding of each phrase, averaged over its tokens (no gradient)."""
    table = mllm.llm.get_input_embeddings()
    with torch.no_grad():
        rows = [table(torch.tensor(mllm.tokenizer(p, add_special_tokens=False)["input_ids"], device=mllm.device))
                for p in phrases]
    return torch.stack([r.mean(0) for r in rows])


TOKEN_ROWS = "trainable_tokens_delta"  # peft's name of the trainable embedding rows


def param_groups(trainee: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: matrices with weight decay, vectors without, and the protocol
    tokens' rows (peft ``trainable_tokens_delta``) at ``optim.token_lr`` without decay. Empty groups dropped."""
    groups = {"decay": [], "no_decay": [], "tokens": []}
    for name, p in trainee.named_parameters():
        if p.requires_grad:
            kind = "tokens" if TOKEN_ROWS in name else "decay" if p.ndim >= 2 else "no_decay"
            groups[kind].append(p)
    token_lr = optim.lr if optim.token_lr is None else optim.token_lr
    spec = [{"params": groups["decay"], "weight_decay": optim.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["tokens"], "weight_decay": 0.0, "lr": token_lr}]
    return [g for g in spec if g["params"]]


def cosine_with_warmup(cfg: TrainConfig):
    """LR multiplier: linear warmup to 1, then cosine down to ``min_lr_ratio`` at ``max_steps``."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class MetricsLog:
    """``metrics.jsonl`` (one row per step; rows past a resume point are dropped) and a loss-curve PNG."""

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict] = []
        if enabled and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        if self.enabled:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self, png: Path) -> Optional[Path]:
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in self.rows]
        for key in ("loss_weighted", "lm"):
            ax.plot(steps, [r.get(key, float("nan")) for r in self.rows], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png
