"""The learnable task queries of a :class:`~taskmllm.model.mllm.TaskMLLM`, one module."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class TaskQueries(nn.Module):
    """The learnable task queries: task name -> ``(K, H)`` parameter (``queries["seg"]``, state keys
    ``queries.<task>`` as a ``ParameterDict`` has them).

    Calling the module, ``queries() -> (ΣK, H)``, reads every task's queries at once, stacked in task order
    (:meth:`rows` gives where each task's begin): the read happens inside the module's forward, where engines that
    gather a module's parameters when it runs (DeepSpeed ZeRO-3) look for it, and every query's gradient arrives
    through the same node whichever tasks a batch has, so data-parallel engines see the same order on every rank.
    """

    def __init__(self, queries: Mapping[str, nn.Parameter]) -> None:
        super().__init__()
        for name, value in queries.items():
            self.register_parameter(name, value)

    def __getitem__(self, task: str) -> nn.Parameter:
        return self._parameters[task]

    def __setitem__(self, task: str, value: nn.Parameter) -> None:
        """Add a task's queries (appended: :meth:`rows` of the existing tasks do not move)."""
        self.register_parameter(task, value)

    def __contains__(self, task: str) -> bool:
        return task in self._parameters

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def values(self):
        return self._parameters.values()

    def items(self):
        return self._parameters.items()

    def rows(self) -> dict[str, int]:
        """Task -> the row of :meth:`forward`'s output where its first query is."""
        starts, row = {}, 0
        for task, value in self._parameters.items():
            starts[task], row = row, row + value.shape[0]
        return starts

    def forward(self) -> torch.Tensor:
        """``(ΣK, H)``: every task's queries, in task order."""
        return torch.cat(list(self._parameters.values()))

