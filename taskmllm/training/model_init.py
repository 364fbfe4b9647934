"""A stage's model from a plain MLLM checkpoint, and the stage's data checked against its model.

``model.init: DIR`` where ``DIR`` is a plain MLLM (no ``experts/``: what ``taskmllm convert llava-hf`` writes, or any
``TaskMLLM.save_pretrained``) becomes a :class:`~taskmllm.router.joint.JointModel` with fresh experts
(:func:`joint_from_mllm`); the stage's ``final/`` is then a full checkpoint the next stage starts from.
"""

from __future__ import annotations

from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.training.config import ModelConfig


def joint_from_mllm(mc: ModelConfig):
    """A JointModel around the plain MLLM checkpoint ``mc.init`` (no ``experts/``, e.g. a converted LLaVA).

    Its experts are built fresh: those of ``model.tasks`` (name -> number of queries), else those ``model.experts``
    names (the registry's query counts), else every registered expert, plus any task the checkpoint already has.
    Their task tokens join the tokenizer with embedding rows at the mean of the existing rows (TPO); the model's
    ``max_frames`` becomes ``model.max_frames``. The stage's ``final/`` is then a full JointModel checkpoint.

    Raises:
        ConfigError: a task that is not a registered expert.
    """
    from taskmllm.experts import EXPERTS
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.router.joint import JointModel
    from taskmllm.zoo import BUILDERS, registry_tasks

    defaults = registry_tasks()
    tasks = dict(mc.tasks) or {name: defaults.get(name, 0) for name in (mc.experts or defaults)}
    unknown = sorted(set(tasks) - set(EXPERTS))
    if unknown:
        raise ConfigError(f"model.tasks / model.experts: {unknown} are not registered experts; known: "
                          f"{', '.join(EXPERTS)}")
    mllm = TaskMLLM.from_pretrained(mc.init, bases=BUILDERS)
    mllm.add_tasks(tasks)
    mllm.config.max_frames = mc.max_frames
    return JointModel.build(mllm, options=mc.experts)


def check_data_fits(joint: nn.Module, specs: dict) -> None:
    """The stage's data sources against the model: every task they write has an expert with enough queries, and
    no clip is longer than the model's ``max_frames`` (a ``ConfigError`` naming the source's option)."""
    from taskmllm.data.sources import check_model_fit

    check_model_fit(specs, {n: e.num_queries for n, e in joint.experts.items()}, joint.mllm.config.max_frames)
