"""Engines that train one micro-batch at a time: plain torch, DistributedDataParallel, DeepSpeed — each used as
its authors intend.

The loop (``training/train.py``) talks to a :class:`Trainer`: ``prepare`` puts a micro-batch on the device,
``forward_backward`` runs the :class:`~taskmllm.training.trainee.Trainee` on it and back-propagates, ``step`` closes a
step of ``grad_accum`` micro-batches.

- :class:`PlainTrainer` (one process): autocast in the stage's precision (a ``GradScaler`` for fp16), global-norm
  clipping, AdamW, the LR schedule.
- :class:`DDPTrainer` (``torchrun``, several processes): the trainee wrapped in ``DistributedDataParallel``, which
  averages the gradients in buckets while backward runs; ``no_sync`` on all but the last micro-batch of a step.
  The expert graph depends on the data; it is made static by running every expert on every micro-batch (a
  zero-weight placeholder call where the micro-batch has none: ``JointModel.forward(placeholders=True)``), which
  ZeRO needs anyway. DDP still runs with ``find_unused_parameters=True``, its documented mechanism for parameters a
  step does not reach: the tracker's prompt-box embedding never trains (training prompts carry no box), and a
  micro-batch of text-only samples leaves the vision side unused. (``static_graph=True`` would skip the per-step
  graph walk, but torch's reducer fails an internal assert when it meets ``no_sync`` gradient accumulation.)
- :class:`DeepSpeedTrainer`: ``engine(micro)``, ``engine.backward(loss)``, ``engine.step()`` every micro-batch (the
  engine accumulates, clips and steps at the boundary). ZeRO-2 keeps its gradient partitioning: each rank holds the
  averaged gradients of its own slice. ZeRO-3 partitions the parameters; every expert, the vision tower and the
  auxiliary heads are ZeRO-3 leaf modules (``set_z3_leaf_modules``: their parameters are gathered at once when
  they run, as for mixture-of-experts layers, because they read some of their weights directly), the task queries
  are external parameters of the modules that read them, and checkpoints gather with ``GatheredParameters``.
  Both need the same modules, in the same order, on every rank: the placeholder calls give that for the experts;
  the number of forwards per micro-batch (images and videos split) is agreed over a CPU process group.

Metrics are averaged over ranks on the device, once per logging interval (:func:`reduce_mean`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.training.config import TrainConfig
from taskmllm.training.data_loader import Collate, MicroBatch
from taskmllm.training.precision import autocast_context, deepspeed_precision, grad_scaler


@dataclass
class DistContext:
    """Where this process trains: ``rank`` of ``world`` processes, its ``device``, and a gloo group on the CPU
    (``cpu_group``) for small host-side agreements that must not wait for the device (None for one process)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    cpu_group: Any = None

    @property
    def distributed(self) -> bool:
        """Whether a process group exists (a launcher started the run, even with one process)."""
        return self.cpu_group is not None

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(device: str, local_rank: int) -> torch.device:
    """The training device of a process: ``auto`` is ``cuda:<local rank>`` when CUDA is available, else the CPU;
    a bare ``cuda`` gets the local rank's index too (``torch.cuda.set_device`` and DDP's ``device_ids`` need one)."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank)
    return dev


def setup_distributed(device: str) -> DistContext:
    """The process's :class:`DistContext` from torchrun/deepspeed's environment (``WORLD_SIZE``, ``LOCAL_RANK``);
    the process group is NCCL on CUDA, gloo on the CPU; ``device`` ``auto`` is ``cuda:<local rank>`` when CUDA
    is available. A launcher's run is distributed even with one process (``torchrun --nproc-per-node 1``: DDP
    over one rank); a plain ``taskmllm train`` is not."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" not in os.environ:
        return DistContext(device=dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    cpu_group = torch.distributed.new_group(backend="gloo") if dev.type == "cuda" else torch.distributed.group.WORLD
    return DistContext(torch.distributed.get_rank(), world, dev, cpu_group)


def reduce_mean(values: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, float]:
    """Mean over ranks of each logged value (a 0-dim tensor on the device; a key absent on a rank counts as 0
    there): one all-reduce on the device and one read of the result."""
    keys = sorted(values)
    if ctx.distributed:  # the keys are host objects: agreed on the CPU group
        gathered: list = [None] * ctx.world
        torch.distributed.all_gather_object(gathered, keys, group=ctx.cpu_group)
        keys = sorted(set().union(*gathered))
    if not keys:
        return {}
    zero = torch.zeros((), device=ctx.device)
    stacked = torch.stack([values.get(k, zero).to(ctx.device, torch.float64) for k in keys])
    if ctx.distributed:
        torch.distributed.all_reduce(stacked)
        stacked /= ctx.world
    return dict(zip(keys, stacked.tolist()))


def agree_min(value: int, ctx: DistContext) -> int:
    """The smallest ``value`` over ranks (a host-side integer, agreed on the CPU group)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=ctx.cpu_group)
    return int(t[0])


def gradient_memory(params: Iterable[nn.Parameter]) -> int:
    """Elements of the gradients attached to ``params`` (each gradient once)."""
    return sum(p.grad.numel() for p in params if p.grad is not None)


# ---------------------------------------------------------------------------------------------- trainers
class Trainer:
    """The loop's view of an engine (see the module docstring). ``memory`` holds this rank's element counts of
    parameters, gradients and optimizer state, measured at the first step (``memory.rank<r>.json``)."""

    partitioned_optimizer = False

    def __init__(self, trainee: nn.Module, optimizer, scheduler, cfg: TrainConfig, precision: str,
                 ctx: DistContext, collate: Collate) -> None:
        self.trainee, self.optimizer, self.scheduler = trainee, optimizer, scheduler
        self.cfg, self.precision, self.ctx, self.collate = cfg, precision, ctx, collate
        self.params = [p for p in trainee.parameters() if p.requires_grad]
        self.memory: dict[str, Any] = {}

    @property
    def optimizer_state(self) -> Any:
        """What a checkpoint saves and restores of the optimizer (``state_dict`` / ``load_state_dict``)."""
        return self.optimizer

    def prepare(self, micro: MicroBatch) -> MicroBatch:
        """``micro`` on the device."""
        return micro.to(self.ctx.device)

    def forward_backward(self, micro: MicroBatch, last: bool) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def step(self) -> torch.Tensor:  # pragma: no cover
        """Clip, step the optimizer and the schedule; returns the gradient norm (a tensor)."""
        raise NotImplementedError

    def record_memory(self) -> None:
        """This rank's parameter / gradient / optimizer-state element counts, once (at the first step)."""
        if not self.memory:
            self.memory = {"rank": self.ctx.rank, "world": self.ctx.world, "engine": type(self).__name__,
                           "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in self.params),
                           **self._held()}

    def _held(self) -> dict[str, int]:
        return {"param_numel": sum(p.numel() for p in self.trainee.parameters()),
                "grad_numel": gradient_memory(self.params)}

    def write_memory(self, out: Path) -> None:
        """``memory.rank<r>.json`` with the counts and this device's peak allocation (CUDA)."""
        report = dict(self.memory)
        if self.ctx.device.type == "cuda":
            report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.ctx.device)
        (out / f"memory.rank{self.ctx.rank}.json").write_text(json.dumps(report, indent=1))

    def gathered(self, modified: bool = False) -> contextlib.AbstractContextManager:
        """A context in which every parameter is whole (ZeRO-3 gathers them; the others have them); ``modified``:
        what is written into them inside (the same on every rank) is kept (ZeRO-3 repartitions it on exit)."""
        return contextlib.nullcontext()

    def finish(self) -> None:
        """After the last step, inside :meth:`gathered`, before the export: nothing but for DeepSpeed (see there)."""

    def loaded(self) -> None:
        """After a checkpoint was loaded into the trainee and the optimizer: nothing but for DeepSpeed."""


class PlainTrainer(Trainer):
    """One process: autocast, optional fp16 loss scaling, clipping, AdamW and the schedule."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model: nn.Module = self.trainee
        self.autocast = autocast_context(self.precision, self.ctx.device)
        self.scaler = grad_scaler(self.precision, self.ctx.device)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward_backward(self, micro: MicroBatch, last: bool) -> dict[str, torch.Tensor]:
        with self._sync_context(last):
            with self.autocast:
                loss, parts = self.model(micro)
            loss = loss / self.cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return parts

    def step(self) -> torch.Tensor:
        self.record_memory()
        for p in self.params:  # a parameter no step reaches still steps (decay, momentum), as in ZeRO's flat buffers
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()


class DDPTrainer(PlainTrainer):
    """Several processes: ``DistributedDataParallel`` averages the gradients (``no_sync`` while accumulating)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dev = self.ctx.device
        self.model = nn.parallel.DistributedDataParallel(
            self.trainee, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()


class DeepSpeedTrainer(Trainer):
    """``engine(micro)``, ``engine.backward(loss)``, ``engine.step()`` under ZeRO stage 1, 2 or 3."""

    partitioned_optimizer = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import deepspeed

        ds = deepspeed_config(self.cfg, self.precision, self.ctx.world)
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        check_zero_stage(self.cfg, self.stage)
        self.engine, *_ = deepspeed.initialize(model=self.trainee, optimizer=self.optimizer,
                                               lr_scheduler=self.scheduler, config=ds)
        if self.stage == 3:
            register_external_parameters(self.trainee.joint)

    def prepare(self, micro: MicroBatch) -> MicroBatch:
        """Every rank must run the same forwards: text-only samples ride with the images, a micro-batch runs as one
        forward wherever some rank's has one group only; a group without any image cannot run the vision modules
        the other ranks run. A cached micro-batch (``stage.cached_calls``) runs every expert on every rank
        already."""
        if not isinstance(micro, MicroBatch):
            return micro.to(self.ctx.device)
        if self.ctx.world > 1:
            micro = self.collate.text_with_visuals(micro)
        if self.ctx.world > 1 and agree_min(len(micro.groups), self.ctx) < len(micro.groups):
            micro = MicroBatch([self.collate.group([s for g in micro.groups for s in g.samples])], micro.indices)
        if self.ctx.world > 1 and any(g.batch.pixel_values is None for g in micro.groups):
            raise InputError("under DeepSpeed every micro-batch needs an image or video (every rank runs the same "
                             "modules): mix text-only samples with visual ones, or train with torchrun (DDP)")
        return micro.to(self.ctx.device)

    def forward_backward(self, micro: MicroBatch, last: bool) -> dict[str, torch.Tensor]:
        loss, parts = self.engine(micro)
        self.engine.backward(loss)  # divided by gradient_accumulation_steps by the engine
        if self.engine.is_gradient_accumulation_boundary():
            self.record_memory()
        self.engine.step()  # steps the optimizer and the schedule at the accumulation boundary
        return parts

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)

    def _held(self) -> dict[str, int]:
        params = list(self.trainee.parameters())
        local = [getattr(p, "ds_tensor", p) for p in params]  # ZeRO-3: the rank's slice of each parameter
        # (ZeRO-3 also keeps parameters under stage3_param_persistence_threshold whole on every rank)
        grads = getattr(self.engine.optimizer, "averaged_gradients", {}) or {}
        partition = sum(t.numel() for g in grads.values() if g is not None
                        for t in (g if isinstance(g, (list, tuple)) else [g]))
        return {"param_numel": sum(t.numel() for t in local), "grad_numel": gradient_memory(params),
                "grad_partition_numel": partition, "zero_stage": self.stage}

    @property
    def optimizer_state(self) -> Any:
        """ZeRO-1/2: the wrapped torch optimizer, whose parameters are this rank's fp32 partitions; ZeRO-3: the
        engine's optimizer (:class:`Zero3OptimizerState`)."""
        return Zero3OptimizerState(self.engine.optimizer, self.ctx.world) if self.stage == 3 else self.optimizer

    def loaded(self) -> None:
        """ZeRO steps fp32 master copies of the weights: refresh them from the loaded weights."""
        self.engine.optimizer.refresh_fp32_params()

    def finish(self) -> None:
        """ZeRO's parameters (under ZeRO-3: gathered ones) are views into flat buffers, which safetensors refuses
        to save: own copies (call inside :meth:`gathered`)."""
        for p in self.trainee.parameters():
            p.data = p.data.clone()

    def gathered(self, modified: bool = False) -> contextlib.AbstractContextManager:
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.trainee.parameters()), modifier_rank=0 if modified else None)


class Zero3OptimizerState:
    """The ZeRO-3 optimizer's state for a checkpoint: its ``state_dict`` (the base optimizer's state over this
    rank's partition) without the loss-scaler object (the engine keeps its own) and the fp32 master partition
    (rebuilt from the loaded weights on loading); loading follows the engine's own checkpoint events."""

    DROPPED = ("loss_scaler", "fp32_flat_groups")

    def __init__(self, zero_optimizer, world: int) -> None:
        self.zero, self.world = zero_optimizer, world

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.zero.state_dict().items() if k not in self.DROPPED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero.checkpoint_event_prologue()
        # DeepSpeed 0.19 sets the fp32 master from these groups, then the weights from it: the weights just loaded
        masters = [flat.detach().float().clone() for flat in self.zero.fp16_partitioned_groups_flat]
        full = {**state, "loss_scaler": self.zero.loss_scaler, "fp32_flat_groups": masters}
        self.zero.load_state_dict([full] * self.world, load_from_fp32_weights=False)  # entry [rank] is read
        self.zero.checkpoint_event_epilogue()


def register_external_parameters(joint: nn.Module) -> None:
    """ZeRO-3: parameters that a module reads without calling the module that owns them are registered with the
    reader (``deepspeed.zero.register_external_parameter``), so ZeRO-3 gathers them when the reader runs: the
    out-projection of every ``nn.MultiheadAttention`` (its forward reads ``out_proj.weight`` directly) and every
    parameter of the vision tower for the tower (open_clip's runs through ``forward_intermediates``). (The experts
    and the task queries read their embeddings through module calls: ``embedding_rows``, ``TaskQueries``.)"""
    import deepspeed

    register = deepspeed.zero.register_external_parameter
    for module in joint.modules():
        if isinstance(module, nn.MultiheadAttention):
            for p in module.out_proj.parameters():
                register(module, p)
    for p in joint.mllm.vision.parameters():
        register(joint.mllm.vision, p)


def check_zero_stage(cfg: TrainConfig, stage: int) -> None:
    """Refuse stage options a ZeRO stage cannot run: FULLER's calibration takes each task's gradient inside the
    forward (``torch.autograd.grad`` on the LLM's last hidden states), which ZeRO-3's parameter gathering does not
    expect (the ranks hang; ZeRO-1/2 and DDP train exactly like one process).

    ``stage.cached_calls`` runs the frozen MLLM outside the engine's forward, where ZeRO-3's partitioned parameters
    are not gathered (and the experts it trains alone are small: ZeRO-2 or DDP hold them whole).

    Raises:
        ConfigError: ``stage.grad_calibration: fuller`` or ``stage.cached_calls`` under ZeRO-3.
    """
    if stage == 3 and cfg.stage.grad_calibration == "fuller":
        raise ConfigError(f"stage.grad_calibration: fuller does not run under DeepSpeed ZeRO-3 ({cfg.deepspeed}); "
                          "use ZeRO-2 (ds_zero2.json), torchrun (DDP) or grad_calibration: none")
    if stage == 3 and cfg.stage.cached_calls:
        raise ConfigError(f"stage.cached_calls does not run under DeepSpeed ZeRO-3 ({cfg.deepspeed}): the frozen "
                          "MLLM runs outside the engine; use ZeRO-2 (ds_zero2.json) or torchrun (DDP)")


def deepspeed_config(cfg: TrainConfig, precision: str, world: int) -> dict[str, Any]:
    """The engine's config: the recipe's ZeRO JSON with the batch sizes, clipping and precision of ``cfg``
    (precision as booleans, :func:`~taskmllm.training.precision.deepspeed_precision`)."""
    ds = json.loads(Path(cfg.deepspeed).read_text())
    ds.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=cfg.grad_accum,
              train_batch_size=cfg.data.batch_size * cfg.grad_accum * world, gradient_clipping=cfg.optim.grad_clip)
    return deepspeed_precision(ds, precision)


def build_trainer(trainee: nn.Module, optimizer, scheduler, cfg: TrainConfig, precision: str, ctx: DistContext,
                  collate: Collate) -> Trainer:
    """DeepSpeed when ``cfg.deepspeed`` names a config, DDP for several processes, plain torch otherwise.

    Raises:
        ConfigError: DeepSpeed is configured but not installed.
    """
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"deepspeed: {cfg.deepspeed} is configured but DeepSpeed is not installed; install it "
                              "with `pip install 'taskmllm[deepspeed]'` or set --deepspeed=''") from exc
        return DeepSpeedTrainer(trainee, optimizer, scheduler, cfg, precision, ctx, collate)
    cls = DDPTrainer if ctx.distributed else PlainTrainer
    return cls(trainee, optimizer, scheduler, cfg, precision, ctx, collate)
