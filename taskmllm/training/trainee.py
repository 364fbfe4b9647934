"""What trains: the joint model and the stage's auxiliary losses as one module whose forward is a micro-batch's loss.

``Trainee.forward(micro_batch) -> (loss, parts)`` is the one call an engine makes per micro-batch: plain torch
calls the module, ``DistributedDataParallel`` wraps it, DeepSpeed calls it through ``engine(...)``. Every expert
of the stage runs on every forward (on a zero-weight placeholder call when the micro-batch has no call for it,
``JointModel.forward(placeholders=True)``), so every rank runs the same modules in the same order: what ZeRO's
gradient buckets and parameter gathering rely on.

The micro-batch's groups (images, videos: :mod:`taskmllm.training.data_loader`) run as separate forwards and their
losses are recombined with the weights one forward of the whole micro-batch gives them: LM by supervised tokens,
each expert's terms by its calls, auxiliary losses by samples. The parts stay tensors on the device (the loop reads
them at its logging interval only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from taskmllm.router.joint import weighted_terms
from taskmllm.training.aux import AuxStates
from taskmllm.training.call_cache import CachedBatch
from taskmllm.training.data_loader import Collate, Group, MicroBatch
from taskmllm.training.grad_calibration import balance_modalities, calibrated_loss
from taskmllm.training.losses import expert_of, total_loss


@dataclass
class LossSettings:
    """The stage's loss options (``stage.*``): ``lm_weight``, ``expert_weights`` (an expert of weight 0 does not
    run), ``detach_context``, ``grad_calibration`` (``none`` or ``fuller``:
    :mod:`taskmllm.training.grad_calibration`)."""

    lm_weight: float = 1.0
    expert_weights: dict[str, float] = field(default_factory=dict)
    detach_context: list[str] = field(default_factory=list)
    grad_calibration: str = "none"


class Trainee(nn.Module):
    """The joint model plus the stage's auxiliary losses (``stage.aux``); ``forward`` is one micro-batch's loss."""

    def __init__(self, joint: nn.Module, aux: nn.ModuleDict, settings: Optional[LossSettings] = None) -> None:
        super().__init__()
        self.joint, self.aux = joint, aux
        self.settings = settings or LossSettings()

    @property
    def active(self) -> list[str]:
        """The experts that run (weight != 0), in the model's order."""
        return [n for n in self.joint.experts if self.settings.expert_weights.get(n, 1.0) != 0]

    def forward(self, micro: MicroBatch | CachedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of ``micro`` (its batches on the model's device) and its parts (detached 0-dim tensors,
        ``total`` included). A :class:`CachedBatch` (``stage.cached_calls``) runs the experts alone."""
        if isinstance(micro, CachedBatch):
            return self._cached(micro)
        runs = [self._group(g) for g in micro.groups]
        experts = list(self.joint.experts)
        lm = _weighted([(r["lm"], r["tokens"]) for r in runs])
        terms: dict[str, torch.Tensor] = {}
        for term in dict.fromkeys(t for r in runs for t in r["experts"]):
            task = expert_of(term, experts)
            terms[term] = _weighted([(r["experts"][term], r["calls"].get(task, 0)) for r in runs
                                     if term in r["experts"]])
        extra = {name: (w, _weighted([(r["extra"][name][1], r["n"]) for r in runs]))
                 for name, (w, _) in runs[0]["extra"].items()}
        loss, parts = total_loss(lm, terms, experts, self.settings.lm_weight, self.settings.expert_weights, extra)
        for zero in (r["zero"] for r in runs if r["zero"] is not None):
            loss = loss + zero  # placeholder runs: on the graph, adding nothing
        parts["total"] = loss.detach()
        if self.settings.grad_calibration == "fuller":
            tasks = task_losses(lm, terms, experts, self.settings, extra)
            loss, norms = calibrated_loss(loss, tasks, [r["hidden"] for r in runs])
            parts.update(norms)
        return loss, parts

    def _cached(self, micro: CachedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The experts' loss on cached calls, each run weighted as ``JointModel.forward`` weighs it."""
        experts, active = self.joint.experts, self.active
        terms, zero = weighted_terms(experts, [
            (r.task, experts[r.task](r.queries, r.features, r.prompts), r.targets, r.group_size, r.placeholder)
            for r in micro.runs if r.task in active])
        anchor = next(iter(terms.values()), zero)
        loss, parts = total_loss(anchor * 0.0, terms, list(experts), 0.0, self.settings.expert_weights)
        if zero is not None:
            loss = loss + zero
        parts["total"] = loss.detach()
        return loss, parts

    @property
    def reads_llm(self) -> bool:
        """Whether any loss of the stage reads past the LLM's inputs: the LM loss, a running expert (the router
        reads the last layer), an auxiliary loss at depth > 0. When none does, a forward stops at the inputs."""
        return self.settings.lm_weight != 0 or bool(self.active) or any(a.depth > 0 for a in self.aux.values())

    def _group(self, group: Group) -> dict:
        """One joint forward: LM loss and supervised tokens, expert terms and calls per task, auxiliary losses."""
        if not self.reads_llm:
            return self._inputs_only(group)
        joint, s = self.joint, self.settings
        logits = "supervised" if s.lm_weight != 0 else "none"  # the LM head only where a loss needs it
        out = joint(group.batch, group.targets, self.active, logits, detach_context=s.detach_context,
                    placeholders=True)
        host = group.batch.on_host()
        states = AuxStates(out.mllm.layer_states, host.input_ids == joint.mllm.image_id, out.mllm.expert_inputs,
                           joint.mllm.config.max_frames, host.labels)
        extra, seen = self._aux_losses(states, group, out.mllm.layer_states[-1])
        calls: dict[str, int] = {}
        for call in out.calls:
            calls[call.task] = calls.get(call.task, 0) + 1
        embeddings = out.mllm.layer_states[0]
        if s.grad_calibration == "fuller" and embeddings.requires_grad:  # FULLER's modality level (this forward)
            visual = group.batch.input_ids == joint.mllm.image_id
            embeddings.register_hook(functools.partial(balance_modalities, visual=visual))
        return {"lm": out.lm_loss, "tokens": group.tokens, "experts": out.expert_losses, "calls": calls,
                "extra": extra, "n": seen, "zero": out.placeholder, "hidden": out.mllm.hidden_states,
                "embeddings": embeddings}

    def _inputs_only(self, group: Group) -> dict:
        """The auxiliary losses of ``group`` on the LLM's input embeddings (visual tokens and queries merged),
        the LLM not run: what a stage whose losses all read depth 0 needs (e.g. a projector warm-up on
        ``words``; on SmolLM2 a step then costs the vision tower, not 30 blocks)."""
        mllm, batch = self.joint.mllm, group.batch
        host = batch.on_host()
        feats, visual = (None, None) if batch.pixel_values is None else mllm.encode_images(batch.pixel_values)
        emb = mllm.embed(batch.input_ids, visual, host.input_ids)  # (B, L, H)
        states = AuxStates((emb,), host.input_ids == mllm.image_id, mllm.expert_inputs(batch, feats, emb),
                           mllm.config.max_frames, host.labels)
        extra, seen = self._aux_losses(states, group, emb)
        return {"lm": emb.sum() * 0.0, "tokens": group.tokens, "experts": {}, "calls": {}, "extra": extra, "n": seen,
                "zero": None, "hidden": emb, "embeddings": emb}

    def _aux_losses(self, states: AuxStates, group: Group, anchor: torch.Tensor
                    ) -> tuple[dict[str, tuple[float, torch.Tensor]], int]:
        """``{name: (weight, loss)}`` of the stage's auxiliary losses on ``states`` and the number of samples with
        pixels (their weight when groups are recombined). A text-only group has no visual token to read: every
        loss is then an exact zero on ``anchor``'s graph."""
        if states.inputs is None:
            nothing = anchor.sum() * 0.0
            extra = {name: (aux.weight, nothing) for name, aux in self.aux.items()}
        else:
            extra = {name: (aux.weight, aux.loss(states, group.samples)) for name, aux in self.aux.items()}
        return extra, sum(1 for frames in group.batch.frames_per_sample if frames)


def task_losses(lm: torch.Tensor, terms: dict[str, torch.Tensor], experts: list[str], settings: LossSettings,
                extra: dict[str, tuple[float, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weighted loss of each task of the stage: ``lm``, each expert (the sum of its terms), each auxiliary
    loss; tasks of weight 0 are left out (what FULLER calibrates)."""
    tasks: dict[str, torch.Tensor] = {}
    if settings.lm_weight:
        tasks["lm"] = lm * settings.lm_weight
    for term, value in terms.items():
        task = expert_of(term, experts)
        w = settings.expert_weights.get(task, 1.0)
        if w:
            tasks[task] = tasks[task] + w * value if task in tasks else w * value
    tasks.update({f"aux_{name}": w * value for name, (w, value) in extra.items() if w})
    return tasks


def _weighted(pairs: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``Σ value·count / Σ count`` (the plain value when there is one pair)."""
    if len(pairs) == 1:
        return pairs[0][0]
    total = sum(c for _, c in pairs) or 1
    return sum(v * (c / total) for v, c in pairs)


def forward_loss(trainee: Trainee, samples: Sequence, device: torch.device
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``samples`` as one micro-batch, collated here (what the data loader's workers do)."""
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    return trainee(micro.to(device))
