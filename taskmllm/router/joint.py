"""JointModel: the MLLM, its experts and the router as one module — the joint forward used for training.

``JointModel.forward(batch, targets)`` runs the MLLM with teacher-forced task tokens and queries, routes the
query states, runs every expert on its calls (batched across samples; samples without a call skip that expert)
and returns the LM loss and every expert's named loss terms. Expert losses reach the queries, the projector
and the LLM through the query hidden states. A checkpoint is the MLLM's directory plus ``experts/<name>/``
(``config.json`` with the :class:`ExpertSpec` + ``model.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Literal, Mapping, Optional, Sequence

import torch
from torch import nn

from taskmllm.errors import CheckpointError, ConfigError, RegistryError
from taskmllm.experts import EXPERTS, build_expert, default_spec
from taskmllm.experts.base import Expert, ExpertSpec, TaskTarget
from taskmllm.model.devices import check_device
from taskmllm.model.io import atomic_directory_write, check_finite_weights, record_checksums, verify_checksums
from taskmllm.model.mllm import MLLMOutput, TaskMLLM
from taskmllm.model.processor import Batch
from taskmllm.router.dispatch import run_calls
from taskmllm.router.router import Router, TaskCall

EXPERTS_DIR = "experts"


@dataclass
class JointOutput:
    """Losses of one joint forward: ``loss`` = LM loss + sum of expert terms (weights applied by experts);
    ``mllm``: the MLLM's output (hidden states by layer, expert inputs) for losses that read more; ``placeholder``:
    the zero-weight term of the placeholder runs (``forward(placeholders=True)``; included in ``loss``)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    expert_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: list[TaskCall] = field(default_factory=list)
    mllm: Optional[MLLMOutput] = None
    placeholder: Optional[torch.Tensor] = None


class JointModel(nn.Module):
    """MLLM + experts (``nn.ModuleDict`` keyed by task name) + a parameter-free router.

    Raises:
        RegistryError: an expert's ``num_queries`` differs from the MLLM's query count for its task.
        UnknownTaskError: a task token of the MLLM has no expert.
    """

    def __init__(self, mllm: TaskMLLM, experts: Mapping[str, Expert]) -> None:
        super().__init__()
        self.mllm = mllm
        self.experts = nn.ModuleDict(dict(experts))
        self.router = Router(mllm.tokenizer, mllm.config.tokens.tasks)
        self.router.check_tasks(list(self.experts))
        for name, expert in self.experts.items():
            k = mllm.queries[name].shape[0]
            if expert.num_queries != k:
                raise RegistryError(f"expert {name!r} expects {expert.num_queries} queries but the model inserts {k} "
                                    f"after <{name}>")

    @classmethod
    def build(cls, mllm: TaskMLLM, options: Optional[Mapping[str, dict]] = None,
              registry: Optional[Mapping[str, type[Expert]]] = None) -> "JointModel":
        """Fresh experts for every task of ``mllm`` with their default options (or ``options[name]``)."""
        experts = {}
        for name, k in mllm.config.tokens.tasks.items():
            spec = default_spec(name, mllm.hidden_size, mllm.vision.width, mllm.vision.grid,
                                mllm.config.vision.image_size, num_queries=k, registry=registry,
                                **(options or {}).get(name, {}))
            experts[name] = build_expert(name, spec, registry)
        return cls(mllm, experts)

    def set_expert_options(self, options: Mapping[str, Mapping[str, object]],
                           fresh: Collection[str] = ()) -> "JointModel":
        """Change options of trained experts that keep their parameters (loss weights, matching costs,
        thresholds) or only add new ones (a detection ``score_head="center"``: the new head starts from its
        initialization); each expert is rebuilt from its new spec and given its weights back. ``fresh`` names
        parts ``"<expert>.<module path>"`` (e.g. ``"det.center_head"``), or whole experts (``"seg"``), that start
        from their initialization instead: their parameters may change shape (``center`` -> ``match`` replaces the
        center head). Returns self.

        Raises:
            ConfigError: an unknown expert or option, a bad value, a ``fresh`` part the rebuilt expert lacks, or
                an option that changes or removes the expert's other parameters (a width, depth or box head:
                train a fresh model for those).
        """
        parts: dict[str, list[str]] = {}
        for item in fresh:
            name, dot, part = item.partition(".")
            if name not in self.experts or (dot and not part):
                raise ConfigError(f"fresh part {item!r}: expected '<expert>' or '<expert>.<module>' with an expert "
                                  f"of {sorted(self.experts)}")
            parts.setdefault(name, []).append(part)
        for name in sorted(set(options) | set(parts)):
            if name not in self.experts:
                raise ConfigError(f"expert options for {name!r}: the model has experts {sorted(self.experts)}")
            self.experts[name] = _rebuilt(name, self.experts[name], options.get(name, {}), parts.get(name, []))
        return self

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch, targets: Sequence[Sequence[TaskTarget]],
                tasks: Optional[Collection[str]] = None,
                logits: Literal["all", "supervised", "none"] = "all",
                detach_context: Collection[str] = (), placeholders: bool = False) -> JointOutput:
        """Joint teacher-forced forward. ``targets[b]`` are sample b's targets in task-token order.

        ``tasks``: the experts to run (default all); a stage whose expert weight is 0 skips that expert's
        forward instead of computing a loss it multiplies by 0. ``logits``: where the LM head runs (see
        :meth:`TaskMLLM.forward`); training passes ``"supervised"``, or ``"none"`` when the LM weight is 0.
        ``detach_context``: experts that read the LLM's visual-token states (``llm_context``) without
        gradient, so their loss reaches the LLM only through their task queries.
        ``placeholders``: every expert of ``tasks`` runs, those without a call in the batch on a placeholder call
        (their own task queries as query states, about the first image) whose outputs enter ``loss`` with weight
        0: the same modules run on every batch, as data-parallel training needs (``run_calls``). Their gradient
        is exactly zero; the logged terms are those of the real calls.
        """
        out = self.mllm(batch, logits)
        host = batch.on_host()  # routing reads token ids: on the host, without waiting for the device
        calls = self.router.route(host.input_ids, out.hidden_states, host.attention_mask)
        flat = match_targets(calls, targets)
        lm = out.loss if out.loss is not None else out.logits.sum() * 0.0
        stand_ins = self._placeholder_queries() if placeholders else None
        runs = run_calls(self.experts, calls, out.expert_inputs, tasks=tasks, detach_context=detach_context,
                         placeholders=stand_ins)
        terms, zero = weighted_terms(self.experts, [(r.task, r.outputs, [flat[id(c)] for c in r.calls], r.group_size,
                                                     r.placeholder) for r in runs])
        total = sum(terms.values(), lm)
        return JointOutput(total if zero is None else total + zero, lm, terms, calls, out, zero)

    def _placeholder_queries(self) -> dict[str, torch.Tensor]:
        """Every expert's ``(K, H)`` task queries, read in one call of the queries module (the same call on every
        batch, whichever tasks it has)."""
        queries = self.mllm.queries
        table, starts = queries(), queries.rows()
        return {t: table[starts[t]: starts[t] + queries[t].shape[0]] for t in self.experts}

    # ----------------------------------------------------------------------------------------------- i/o
    def save_pretrained(self, path: str | Path, extra: Optional[Mapping[str, str]] = None) -> Path:
        """Atomically write the MLLM checkpoint plus ``experts/<name>/{config.json, model.safetensors}`` and
        ``checksums.json`` (every weight file's SHA-256). ``extra``: more text files (name -> content) written
        inside the same rename, e.g. a training run's ``train_config.yaml``."""
        from safetensors.torch import save_model

        def write(tmp: Path) -> None:
            self.mllm.write_files(tmp)
            for name, expert in self.experts.items():
                d = tmp / EXPERTS_DIR / name
                d.mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(expert.spec.to_dict(), indent=2))
                save_model(expert, str(d / "model.safetensors"))
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
            record_checksums(tmp)

        return atomic_directory_write(path, write)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        registry: Optional[Mapping[str, type[Expert]]] = None, verify: bool = True,
                        dtype: Optional[torch.dtype] = None) -> "JointModel":
        """Load a directory written by :meth:`save_pretrained`, or a shipped model by name (``"tiny"``).

        ``verify``: check every weight file against the checksums recorded at save and the weights for NaN/inf
        (see :meth:`TaskMLLM.from_pretrained`). ``dtype`` (None: as stored): every module is built without random
        initialisation and its weights are read onto ``device`` in that dtype. Typed errors name the bad file."""
        from taskmllm.zoo import BUILDERS, resolve_checkpoint

        device = check_device(device)
        path = resolve_checkpoint(path)
        mllm = TaskMLLM.from_pretrained(path, device=device, bases=BUILDERS, verify=verify, dtype=dtype)
        experts = {name: _load_expert(path, name, mllm, device, registry, verify, dtype)
                   for name in mllm.config.tokens.tasks}
        return cls(mllm, experts).to(device).eval()


def _load_expert(path: Path, name: str, mllm: TaskMLLM, device: torch.device,
                 registry: Optional[Mapping[str, type[Expert]]], verify: bool,
                 dtype: Optional[torch.dtype]) -> Expert:
    """Expert ``name`` of checkpoint ``path``, checked to fit ``mllm`` before it is built (without random
    initialisation; its weights read onto ``device`` in ``dtype``, None: as stored)."""
    from safetensors import SafetensorError

    from taskmllm.model.loading import empty_module, load_weights

    d = path / EXPERTS_DIR / name
    for f in ("config.json", "model.safetensors"):
        if not (d / f).is_file():
            raise CheckpointError(d / f, f"missing: the checkpoint has task <{name}> but no expert weights")
    try:
        spec = ExpertSpec.from_dict(json.loads((d / "config.json").read_text(encoding="utf-8")))
    except (ValueError, ConfigError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(d / "config.json", str(exc)) from exc
    if (spec.hidden_size, spec.vision_dim) != (mllm.hidden_size, mllm.vision.width):
        raise CheckpointError(d / "config.json", f"expert {name!r} reads hidden size {spec.hidden_size} and vision "
                              f"width {spec.vision_dim}, the model has {mllm.hidden_size} and {mllm.vision.width}")
    if verify:
        verify_checksums(path, [f"{EXPERTS_DIR}/{name}/model.safetensors"])
    try:
        expert = empty_module(lambda: build_expert(name, spec, registry if registry is not None else EXPERTS))
    except ConfigError as exc:
        raise CheckpointError(d / "config.json", str(exc)) from exc
    try:
        missing, unexpected = load_weights(expert, d / "model.safetensors", dtype, device)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(d / "model.safetensors", f"cannot load expert weights: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(d / "model.safetensors", f"cannot load expert weights: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if verify:
        check_finite_weights(expert, d / "model.safetensors")
    return expert


def weighted_terms(experts: Mapping[str, Expert],
                   runs: Sequence[tuple[str, object, Sequence[TaskTarget], int, bool]]
                   ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Every expert's loss terms over its runs ``(task, outputs, targets, group_size, placeholder)``: a run's terms
    weigh ``len(targets) / group_size`` in its task's (a task's calls split by frame count are one mean), and the
    placeholder runs' outputs sum into one zero-weight term (None without any). Training's one weighting, live
    (``JointModel.forward``) and on cached calls (``training/trainee.py``)."""
    terms: dict[str, torch.Tensor] = {}
    zero = None
    for task, outputs, targets, group_size, placeholder in runs:
        if placeholder:
            zero = zero_weight(outputs) if zero is None else zero + zero_weight(outputs)
            continue
        for name, value in experts[task].loss(outputs, list(targets)).items():
            terms[name] = terms.get(name, 0.0) + value * len(targets) / group_size
    return terms, zero


def zero_weight(outputs: object) -> torch.Tensor:
    """``0 * Σ`` of every floating tensor of an expert's outputs (a dataclass): on the graph, adding nothing."""
    values = vars(outputs).values() if hasattr(outputs, "__dict__") else [outputs]
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return sum(t.float().sum() for t in tensors) * 0.0


def match_targets(calls: Sequence[TaskCall], targets: Sequence[Sequence[TaskTarget]]) -> dict[int, TaskTarget]:
    """Pair each call with its sample's target of the same order; task names must agree."""
    per_sample: dict[int, list[TaskCall]] = {}
    for c in calls:
        per_sample.setdefault(c.sample, []).append(c)
    matched = {}
    for b in range(len(targets)):
        got, want = per_sample.get(b, []), list(targets[b])
        if [c.task for c in got] != [t.task for t in want]:
            raise ConfigError(f"sample {b}: the answer's task tokens {[c.task for c in got]} do not match its "
                              f"targets {[t.task for t in want]}")
        matched.update({id(c): t for c, t in zip(got, want)})
    return matched


def _rebuilt(name: str, old: nn.Module, opts: Mapping[str, object], fresh: Sequence[str]) -> nn.Module:
    """Expert ``name`` (module ``old``) rebuilt with options ``opts`` and its weights, except the submodules
    ``fresh`` (module paths; ``""`` the whole expert), which keep the new module's initialization. See :meth:`JointModel.set_expert_options`."""
    spec = replace(old.spec, options={**old.spec.options, **dict(opts)})
    with torch.random.fork_rng(devices=[]):  # building the new module must not shift training's RNG
        new = type(old)(spec)
    for part in fresh:
        try:
            new.get_submodule(part)
        except AttributeError as exc:
            raise ConfigError(f"fresh part {part!r}: the rebuilt {name!r} expert has no such module") from exc
    restarted = tuple(f"{part}." if part else "" for part in fresh)  # state keys are "<path>.<tensor>"
    kept = {k: v for k, v in old.state_dict().items() if not k.startswith(restarted)}
    shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    if any(shapes.get(k) != tuple(v.shape) for k, v in kept.items()):
        raise ConfigError(f"expert options {sorted(opts)} of {name!r} change its parameters; a trained "
                          f"expert can change only options that keep them (loss weights, thresholds), add new "
                          f"ones, or name the changed part in model.fresh (e.g. det.center_head)")
    ref = next(old.parameters(), None)
    if ref is not None:
        new.to(ref.device, ref.dtype)
    new.load_state_dict(kept, strict=False)  # keys checked above: only new or fresh ones are missing
    return new.train(old.training)

