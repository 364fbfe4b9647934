"""apply_stage(): the one place that sets ``requires_grad`` — ``frozen | lora | full`` per component.

Components of a :class:`~taskmllm.router.joint.JointModel`: ``vision``, ``projector``, ``llm``, ``queries``,
``experts.<name>`` (``experts`` = all of them), plus the stage's auxiliary losses ``aux.<name>`` (full unless the
stage says otherwise: they exist only to train).
``lora`` wraps the component in a peft ``LoraModel`` on every linear layer (the LLM's ``lm_head`` included
when ``lora.lm_head``) and, for the LLM, makes the protocol tokens' embedding rows trainable (peft
``trainable_token_indices``). :func:`merge_lora` folds the adapters back for export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.tokens import PROTOCOL_TOKENS, task_token
from taskmllm.training.config import StageConfig

log = logging.getLogger(__name__)


@dataclass
class ComponentReport:
    name: str
    mode: str
    trainable: int
    total: int


def components(joint: nn.Module, aux: Optional[Mapping[str, nn.Module]] = None) -> dict[str, tuple[nn.Module, str]]:
    """Component name -> ``(parent module, attribute)`` so a component can be read and replaced."""
    mllm = joint.mllm
    out = {"vision": (mllm, "vision"), "projector": (mllm, "projector"), "llm": (mllm, "llm"),
           "queries": (mllm, "queries")}
    out.update({f"experts.{name}": (joint.experts, name) for name in joint.experts})
    out.update({f"aux.{name}": (aux, name) for name in (aux or {})})
    return out


def resolve_modes(stage: StageConfig, names: list[str]) -> dict[str, str]:
    """Mode of every component: frozen unless named (auxiliary losses: full); ``experts`` (``aux``) applies to
    every expert (auxiliary loss), ``experts.<name>`` (``aux.<name>``) overrides it."""
    modes = {n: "full" if n.startswith("aux.") else "frozen" for n in names}
    for key, mode in sorted(stage.trainable.items(), key=lambda kv: kv[0].count(".")):
        if key in ("experts", "aux"):
            modes.update({n: mode for n in names if n.startswith(key + ".")})
        elif key in modes:
            modes[key] = mode
        else:
            raise ConfigError(f"stage {stage.name!r}: component {key!r} does not exist in this model; "
                              f"components: {', '.join(names)}")
    if all(m == "frozen" for m in modes.values()):
        raise ConfigError(f"stage {stage.name!r} freezes every component: nothing would train")
    if modes.get("queries") == "lora":
        raise ConfigError("queries are plain embeddings: use 'full' or 'frozen', not 'lora'")
    return modes


def apply_stage(joint: nn.Module, stage: StageConfig, aux: Optional[nn.ModuleDict] = None,
                new_token_ids: Optional[list[int]] = None) -> list[ComponentReport]:
    """Freeze / LoRA-wrap / unfreeze each component of ``joint`` (and ``aux``) as ``stage.trainable`` says.

    Raises :class:`ConfigError` for an unknown component, a stage that freezes everything, or LoRA on a
    component without linear layers. Returns (and logs) a table of trainable parameters per component.
    """
    comps = components(joint, aux)
    modes = resolve_modes(stage, list(comps))
    for p in joint.parameters():
        p.requires_grad_(False)
    for p in (aux.parameters() if aux is not None else ()):
        p.requires_grad_(False)
    for name, (parent, attr) in comps.items():
        module = parent[attr] if isinstance(parent, (nn.ModuleDict, nn.ParameterDict)) else getattr(parent, attr)
        if modes[name] == "full":
            for p in module.parameters():
                p.requires_grad_(True)
        elif modes[name] == "lora":
            wrapped = _lora(module, stage, name, new_token_ids if name == "llm" else None)
            if isinstance(parent, nn.ModuleDict):
                parent[attr] = wrapped
            else:
                setattr(parent, attr, wrapped)
    report = []
    for name, (parent, attr) in comps.items():
        module = parent[attr] if isinstance(parent, (nn.ModuleDict, nn.ParameterDict)) else getattr(parent, attr)
        params = list(module.parameters())
        report.append(ComponentReport(name, modes[name], sum(p.numel() for p in params if p.requires_grad),
                                      sum(p.numel() for p in params)))
    log.info("stage %s\n%s", stage.name, format_table(report))
    return report


def format_table(report: list[ComponentReport]) -> str:
    """Fixed-width table: component, mode, trainable / total parameters."""
    rows = [f"{'component':<18}{'mode':<8}{'trainable':>12}{'total':>12}"]
    rows += [f"{r.name:<18}{r.mode:<8}{r.trainable:>12,}{r.total:>12,}" for r in report]
    rows.append(f"{'total':<26}{sum(r.trainable for r in report):>12,}{sum(r.total for r in report):>12,}")
    return "\n".join(rows)


def _lora(module: nn.Module, stage: StageConfig, name: str, new_token_ids: Optional[list[int]]) -> nn.Module:
    from peft import LoraConfig, LoraModel

    targets = sorted(n for n, m in module.named_modules() if _lora_target(module, n, m))
    tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
    if not stage.lora.lm_head or (tied and new_token_ids):  # a tied lm_head is the embedding: rows train instead
        targets = [t for t in targets if t.rsplit(".", 1)[-1] != "lm_head"]
    if not targets:
        raise ConfigError(f"component {name!r} has no linear layers for LoRA; use 'full' or 'frozen'")
    extra = {}
    if new_token_ids:
        extra = dict(trainable_token_indices={"embed_tokens": sorted(new_token_ids)}, ensure_weight_tying=tied)
    cfg = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                     target_modules=targets, **extra)
    return LoraModel(module, cfg, "default")


def _lora_target(root: nn.Module, name: str, module: nn.Module) -> bool:
    """Linear layers, except those used through ``F.multi_head_attention_forward`` (their weight is read raw)."""
    if not isinstance(module, nn.Linear) or not name:
        return False
    parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
    return not isinstance(parent, nn.MultiheadAttention)


def merge_lora(joint: nn.Module, aux: Optional[nn.ModuleDict] = None) -> None:
    """Fold every LoRA adapter (and trainable token rows) into its base weights, in place."""
    from peft import LoraModel

    for _, (parent, attr) in components(joint, aux).items():
        module = parent[attr] if isinstance(parent, (nn.ModuleDict, nn.ParameterDict)) else getattr(parent, attr)
        if isinstance(module, LoraModel):
            merged = module.merge_and_unload()
            if isinstance(parent, nn.ModuleDict):
                parent[attr] = merged
            else:
                setattr(parent, attr, merged)


def protocol_token_ids(tokenizer, tasks: Iterable[str] = ()) -> list[int]:
    """Ids of taskmllm's protocol tokens (image, query, ref, box and the task tokens of ``tasks``) in
    ``tokenizer``: the rows a LoRA stage trains in full. A pretrained LLM's own special tokens (ChatML's
    ``<|im_end|>`` ...) are not among them: it already knows them."""
    vocab = tokenizer.get_vocab()
    names = dict.fromkeys([*PROTOCOL_TOKENS, *(task_token(t) for t in tasks)])
    return sorted(vocab[n] for n in names if n in vocab)
