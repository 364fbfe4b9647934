"""The parameter-free router: token ids + last-layer hidden states -> task calls.

A **call** is a task token followed by exactly that task's K ``<query>`` ids (a task token typed into a prompt
has no queries after it and is not a call). The call's query states are the hidden states at the K query
positions; its phrase is the ``<ref>…</ref>`` that stands after the previous call and before the task token.
The same :meth:`Router.route_sequence` serves the teacher-forced path (:meth:`Router.route`, over a padded batch)
and the generation path (:meth:`Router.route_generation`, over each sample's new ids), so both hand the experts
the same states for the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from taskmllm.errors import UnknownTaskError
from taskmllm.model.generation import GenerationOutput
from taskmllm.model.tokens import QUERY, REF_CLOSE, REF_OPEN, task_token


@dataclass
class TaskCall:
    """One routed call.

    Attributes:
        task: expert name (``"seg"``, ``"det"``, ``"track"``).
        sample: index of the sample in the batch.
        position: index of the task token in the routed sequence.
        phrase: the ``<ref>`` phrase naming the target, or None.
        query_states: ``(K, H)`` last-layer hidden states at the query positions.
    """

    task: str
    sample: int
    position: int
    phrase: Optional[str]
    query_states: torch.Tensor


class Router:
    """Finds task calls in token sequences. Holds no parameters.

    Args:
        tokenizer: the model's tokenizer (decodes ``<ref>`` phrases, resolves token ids).
        tasks: expert name -> K, the number of queries after its task token.
    """

    def __init__(self, tokenizer, tasks: Mapping[str, int]) -> None:
        ids = tokenizer.convert_tokens_to_ids
        self.tokenizer = tokenizer
        self.tasks = dict(tasks)
        self.task_by_id = {ids(task_token(t)): t for t in tasks}
        self.query_id, self.ref_open, self.ref_close = ids(QUERY), ids(REF_OPEN), ids(REF_CLOSE)

    def route_sequence(self, ids: Sequence[int], hidden: torch.Tensor, sample: int = 0) -> list[TaskCall]:
        """Calls in one sequence; ``hidden`` is ``(len(ids), H)`` aligned with ``ids``."""
        ids = [int(i) for i in ids]
        calls: list[TaskCall] = []
        start = 0  # where the current call's text begins (after the previous call)
        for pos, tok in enumerate(ids):
            task = self.task_by_id.get(tok)
            if task is None:
                continue
            k = self.tasks[task]
            if ids[pos + 1: pos + 1 + k] != [self.query_id] * k:
                continue  # a task token without its queries is text, not a call
            calls.append(TaskCall(task, sample, pos, self._phrase(ids[start:pos]), hidden[pos + 1: pos + 1 + k]))
            start = pos + 1 + k
        return calls

    def _phrase(self, ids: list[int]) -> Optional[str]:
        """The last complete ``<ref>…</ref>`` in ``ids``."""
        if self.ref_close not in ids:
            return None
        close = len(ids) - 1 - ids[::-1].index(self.ref_close)
        opens = [i for i in range(close) if ids[i] == self.ref_open]
        if not opens:
            return None
        return self.tokenizer.decode(ids[opens[-1] + 1: close], skip_special_tokens=False).strip()

    def route(self, input_ids: torch.Tensor, hidden_states: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None) -> list[TaskCall]:
        """Teacher-forced path: calls in a padded batch ``(B, L)`` with hidden states ``(B, L, H)``."""
        calls = []
        for b in range(input_ids.shape[0]):
            keep = slice(None) if attention_mask is None else attention_mask[b].bool()
            calls += self.route_sequence(input_ids[b][keep].tolist(), hidden_states[b][keep], b)
        return calls

    def route_generation(self, out: GenerationOutput) -> list[TaskCall]:
        """Generation path: calls in each sample's new ids with their hidden states."""
        calls = []
        for b, (seq, hidden) in enumerate(zip(out.sequences, out.hidden_states)):
            calls += self.route_sequence(seq, hidden, b)
        return calls

    def check_tasks(self, registered: Sequence[str]) -> None:
        """Raise :class:`UnknownTaskError` if a task token of this router has no registered expert."""
        missing = sorted(set(self.tasks) - set(registered))
        if missing:
            raise UnknownTaskError(f"task token(s) {', '.join(task_token(t) for t in missing)} have no registered "
                                   f"expert; registered: {', '.join(sorted(registered)) or '(none)'}")


def group_calls(calls: Sequence[TaskCall]) -> dict[str, list[TaskCall]]:
    """Calls grouped by task, each group in batch order."""
    groups: dict[str, list[TaskCall]] = {}
    for call in calls:
        groups.setdefault(call.task, []).append(call)
    return groups
