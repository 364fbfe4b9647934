"""One training loop for every stage: ``taskmllm train RECIPE/STAGE.yaml [--a.b=c ...]``.

Read top to bottom: set up (distributed, config checks, model, stage, optimizer, schedule, resume), then a loop
of ``grad_accum`` micro-batches through the joint forward (:meth:`JointModel.forward`), the weighted loss,
gradient averaging over ranks, clipping, an AdamW step and a checkpoint every ``save_every`` steps. Launch
with ``taskmllm train``, ``torchrun --nproc-per-node N -m taskmllm.cli train ...`` (gloo on CPU, nccl on
GPU) or ``deepspeed``. The data order is a pure function of ``(seed, position)`` so a resumed run sees the
same batches; global batch = ``batch_size * grad_accum * world_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.processor import IGNORE
from taskmllm.training.aux import AuxContext, AuxStates, build_aux
from taskmllm.training.checkpoint import Checkpointer
from taskmllm.training.config import OptimConfig, TrainConfig, check_paths, config_yaml, save_config
from taskmllm.training.losses import check_expert_names, expert_of, total_loss
from taskmllm.training.model_init import check_data_fits
from taskmllm.training.stages import apply_stage, merge_lora, protocol_token_ids

log = logging.getLogger(__name__)


class Trainee(nn.Module):
    """What trains: the joint model plus the stage's auxiliary losses (``stage.aux``)."""

    def __init__(self, joint: nn.Module, aux: nn.ModuleDict) -> None:
        super().__init__()
        self.joint, self.aux = joint, aux


def train(cfg: TrainConfig) -> Path:
    """Run one stage; returns ``<out_dir>/final`` (a JointModel directory the next stage can ``init`` from)."""
    cfg.validate()
    check_paths(cfg)
    rank, world, device = setup_distributed(cfg.device)
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)

    # ---- model, stage, optimizer, schedule
    joint = build_joint(cfg)
    for key in ("expert_weights", "detach_context"):
        check_expert_names(f"stage.{key}", getattr(cfg.stage, key), list(joint.experts))
    specs = cfg.data.specs()
    check_data_fits(joint, specs)  # every source's tasks, query counts and clip lengths against the model
    aux = build_aux(cfg.stage.aux, aux_context(joint, specs))
    report = apply_stage(joint, cfg.stage, aux, protocol_token_ids(joint.mllm.tokenizer, joint.mllm.config.tokens.tasks))
    trainee = Trainee(joint, aux).to(device)
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(trainee, cfg.optim), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
    engine = deepspeed_engine(cfg, trainee, optimizer, scheduler) if cfg.deepspeed else None

    # ---- resume (every compatibility check happens here, before the first forward)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last, rank, world)
    start_step, position = 0, 0
    resume_from = ckpt.resolve(cfg.resume)
    if resume_from is not None:
        state = ckpt.check(resume_from, trainee)
        ckpt.load(resume_from, state, trainee, optimizer, scheduler)
        if engine is not None:  # ZeRO steps fp32 master copies of the weights: refresh them from the loaded ones
            engine.optimizer.refresh_fp32_params()
        start_step, position = state["step"], state["data_position"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    dataset = build_dataset(cfg, specs)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_config.yaml")
        (out / "trainable.json").write_text(json.dumps([dataclasses.asdict(r) for r in report], indent=1))
    metrics = MetricsLog(out / "metrics.jsonl", start_step, enabled=rank == 0)
    autocast = autocast_context(cfg.precision, device)

    # ---- the loop
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=rank != 0 or not cfg.progress, desc=cfg.stage.name)
    trainee.train()
    t0 = time.perf_counter()
    for step in bar:
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            samples = micro_batch(dataset, cfg, position, rank, world)
            position += 1
            with autocast:
                loss, parts = forward_loss(trainee, samples, cfg, device)
            loss = loss / cfg.grad_accum
            (deepspeed_backward(engine, loss, params) if engine is not None else loss.backward())
            if engine is not None:
                engine.step()  # DeepSpeed accumulates, clips and steps at the boundary itself
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        if engine is None:
            average_gradients(params, world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        row = {"step": step + 1, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "time_s": round(time.perf_counter() - t0, 3), **average_scalars(sums, world, device)}
        row["loss_weighted"] = row.pop("total")
        metrics.write(row)
        bar.set_postfix(loss=f"{row['loss_weighted']:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            ckpt.save(step + 1, trainee, optimizer, scheduler, position, cfg,
                      partitioned_optimizer=engine is not None)
            metrics.plot(out / "loss.png")

    # ---- export: LoRA merged, a plain JointModel directory
    final = out / "final"
    if engine is not None:  # ZeRO's parameters are views into one flat buffer, which safetensors will not save
        for p in trainee.parameters():
            p.data = p.data.clone()
    if rank == 0:
        merge_lora(joint, aux)
        joint.save_pretrained(final, extra={"train_config.yaml": config_yaml(cfg)})  # one rename: never without it
    if world > 1:
        torch.distributed.barrier()
    return final


# ----------------------------------------------------------------------------------------- pieces
def forward_loss(trainee: Trainee, samples: list, cfg: TrainConfig, device: torch.device):
    """Joint forward of one micro-batch -> (weighted total loss, floats per part incl. ``total``).

    Video samples and the rest run as two forwards, so that images are not padded to a video's length (8
    frames x 36 tokens: padding a batch to it cost 4x the compute); the parts are recombined with the weights
    one forward of the whole batch gives them: LM by supervised tokens, each expert's terms by its calls.
    """
    groups = [g for g in ([s for s in samples if s.frames is None], [s for s in samples if s.frames is not None]) if g]
    runs = [_group_forward(trainee, group, cfg, device) for group in groups]
    experts = list(trainee.joint.experts)
    lm = _weighted([(r["lm"], r["tokens"]) for r in runs])
    terms: dict[str, torch.Tensor] = {}
    for term in dict.fromkeys(t for r in runs for t in r["experts"]):
        task = expert_of(term, experts)
        terms[term] = _weighted([(r["experts"][term], r["calls"].get(task, 0)) for r in runs if term in r["experts"]])
    extra = {name: (w, _weighted([(r["extra"][name][1], r["n"]) for r in runs]))
             for name, (w, _) in runs[0]["extra"].items()}
    loss, parts = total_loss(lm, terms, experts, cfg.stage.lm_weight, cfg.stage.expert_weights, extra)
    parts["total"] = float(loss.detach())
    return loss, parts


def _weighted(pairs: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``Σ value·count / Σ count`` (the plain value when there is one pair)."""
    if len(pairs) == 1:
        return pairs[0][0]
    total = sum(c for _, c in pairs) or 1
    return sum(v * (c / total) for v, c in pairs)


def _group_forward(trainee: Trainee, samples: list, cfg: TrainConfig, device: torch.device) -> dict:
    """One joint forward: its LM loss and supervised-token count, expert terms and calls per task, extras."""
    joint = trainee.joint
    visuals = [s.frames if s.frames is not None else s.image for s in samples]
    batch = joint.mllm.processor.conversations([s.turns for s in samples], visuals).to(device)  # every turn
    weights = cfg.stage.expert_weights
    active = [name for name in joint.experts if weights.get(name, 1.0) != 0]  # weight 0: skip the forward
    logits = "supervised" if cfg.stage.lm_weight != 0 else "none"  # the LM head only where a loss needs it
    out = joint(batch, [s.targets for s in samples], active, logits, detach_context=cfg.stage.detach_context)
    states = AuxStates(out.mllm.layer_states, batch.input_ids == joint.mllm.image_id, out.mllm.expert_inputs,
                       joint.mllm.config.max_frames)
    extra = {name: (aux.weight, aux.loss(states, samples)) for name, aux in trainee.aux.items()}
    calls: dict[str, int] = {}
    for call in out.calls:
        calls[call.task] = calls.get(call.task, 0) + 1
    tokens = int((batch.labels[:, 1:] != IGNORE).sum()) if batch.labels is not None else 0
    return {"lm": out.lm_loss, "tokens": tokens, "experts": out.expert_losses, "calls": calls, "extra": extra,
            "n": len(samples)}


def micro_batch(dataset, cfg: TrainConfig, position: int, rank: int, world: int) -> list:
    """Samples of micro-batch ``position`` for ``rank``: a seeded permutation per epoch, sliced by rank."""
    n, bs = len(dataset), cfg.data.batch_size
    start = (position * world + rank) * bs
    out = []
    for g in range(start, start + bs):
        epoch, i = divmod(g, n)
        order = epoch_order(cfg.seed, epoch, n) if n <= 1_000_000 else None
        out.append(dataset[int(order[i]) if order is not None else (i * 2654435761 + epoch) % n])
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of ``range(n)`` for one epoch (computed once per epoch, not per sample)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def build_joint(cfg: TrainConfig):
    """A recipe's model built fresh (``model.init: tiny | smol``, with ``model.*`` overrides), a JointModel
    directory (``model.experts`` may then change its experts' loss weights and thresholds), or a plain MLLM
    checkpoint without experts (what ``taskmllm convert`` writes: ``model_init.joint_from_mllm`` adds fresh experts)."""
    from taskmllm.zoo import BUILDERS
    from taskmllm.router.joint import EXPERTS_DIR, JointModel

    mc = cfg.model
    if mc.init not in BUILDERS:
        plain = not (Path(mc.init) / EXPERTS_DIR).is_dir()
        if mc.llm or mc.vision or mc.projector or (mc.tasks and not plain):
            raise ConfigError(f"model.llm / model.vision / model.projector override only a fresh recipe model "
                              f"({', '.join(BUILDERS)}); model.tasks also a plain MLLM checkpoint")
        if plain:
            from taskmllm.training.model_init import joint_from_mllm

            return joint_from_mllm(cfg.model)
        # a checkpoint's experts may change options that keep their parameters (a stage's loss weights)
        return JointModel.from_pretrained(mc.init).set_expert_options(mc.experts)
    mllm = BUILDERS[mc.init](max_frames=mc.max_frames, llm=mc.llm, vision=mc.vision, tasks=mc.tasks,
                            projector=mc.projector)
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
                      label_classes(specs))


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


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun/deepspeed env vars; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, dev


def average_gradients(params: list, world: int) -> None:
    """All-reduce mean of gradients (a parameter unused on one rank counts as zero there)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def average_scalars(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Mean over ranks of each logged scalar (a term absent on a rank counts as 0 there)."""
    if world == 1:
        return values
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, sorted(values))
    keys = sorted(set().union(*gathered))
    t = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA devices that support it (``auto``/``bf16``); full precision otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def deepspeed_backward(engine, loss: torch.Tensor, params: list) -> None:
    """``engine.backward(loss)`` with every rank handing DeepSpeed its gradients in the same order.

    ZeRO-2 fills its reduction buckets in the order its per-parameter hooks fire, i.e. the order backward
    reaches each parameter. The joint graph depends on the data (an expert runs only on the samples that call
    it), so two ranks would fill their buckets differently: a collective mismatch, or silently summed gradients
    of different parameters. So the gradients are computed here (``autograd.grad`` fires no hooks) and handed to
    DeepSpeed through the surrogate ``sum <p, g>``, whose graph is the same on every rank and whose gradient
    with respect to ``p`` is exactly ``g`` (zero for a parameter unused on this rank). ``loss`` is already
    divided by ``grad_accum``, so DeepSpeed must not divide again (``scale_wrt_gas=False``).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    surrogate = sum((p * (g if g is not None else torch.zeros_like(p))).sum() for p, g in zip(params, grads))
    engine.backward(surrogate, scale_wrt_gas=False)


def deepspeed_engine(cfg: TrainConfig, trainee: nn.Module, optimizer, scheduler):
    """A DeepSpeed engine from the recipe's ZeRO JSON (batch sizes and clipping taken from ``cfg``)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(f"deepspeed: {cfg.deepspeed} is configured but DeepSpeed is not installed; "
                          "install it with `pip install 'taskmllm[deepspeed]'` or set --deepspeed=''") from exc
    ds = json.loads(Path(cfg.deepspeed).read_text())
    ds.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=cfg.grad_accum,
              gradient_clipping=cfg.optim.grad_clip)
    engine, *_ = deepspeed.initialize(model=trainee, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine


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
