"""Dynamic batching of the demo's concurrent requests: requests that may share a model call run as one.

Each request keeps its own Gradio worker thread (its uploads decoded, its session's chat history read and written
there) and hands its checked, decoded request to :meth:`RequestBatcher.submit`, which blocks until its answer is
ready. While the model is busy, arriving requests wait; when it is free, the oldest waiting request and the
requests with the same **key** (the same generation settings and intervention: :func:`batch_key`), in arrival
order and at most ``max_batch_size`` of them, run as one call. A request waits at most ``max_wait_s`` after its
arrival for others to join an idle model; under load the queue fills while the model works, so no wait is added.

Why not Gradio's own ``batch=True``: Gradio 6 runs a batch with the session state of its *first* request, so every
request of a batch would read (and the first session would be left with) another user's chat history (``gr.State``),
and an exception fails every request of the batch; here each request keeps its session and its own error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

from taskmllm.errors import ConfigError


def batch_key(intervention: Any, settings: Any) -> Hashable:
    """The key under which demo requests may share one Pipeline call: their generation settings (a frozen
    :class:`~taskmllm.predict.GenerationSettings`) and their intervention object (the Pipeline builds one object per
    name and settings, so equal settings give the same object). A sampled request gets a key of its own: a batch
    draws every row from one generator, so its answer would differ from the one it gets alone with its seed."""
    if getattr(settings, "do_sample", False):
        return object()
    return settings, None if intervention is None else id(intervention)


@dataclass(eq=False)
class _Pending:
    key: Hashable
    item: Any
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False
    result: Any = None
    error: Optional[BaseException] = None


class RequestBatcher:
    """Runs ``run_batch(items) -> outcomes`` over groups of submitted items with equal keys, one group at a time.

    ``run_batch`` returns one outcome per item, in order: its result, or an exception, which :meth:`submit` raises
    in that item's thread only. An exception raised by ``run_batch`` itself goes to every item of the group.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 8,
                 max_wait_s: float = 0.01) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s <= 60:
            raise ConfigError(f"the batch wait must be a number of seconds in [0, 60], got {max_wait_s!r}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self._cond = threading.Condition()

    def submit(self, key: Hashable, item: Any) -> Any:
        """``item``'s outcome, after it ran in a group of items with the same ``key`` (blocks until then).

        The calling thread may run other groups first: whichever waiting thread finds the model free runs the
        group of the oldest waiting item.
        """
        pending = _Pending(key, item)
        with self._cond:
            self._queue.append(pending)
            self._cond.notify_all()  # a runner gathering a group may be waiting for this one
        while True:
            with self._cond:
                while self._busy and not pending.done:
                    self._cond.wait()
                if pending.done:
                    break
                self._busy = True
                group = self._gather()
            try:
                self._run(group)
            finally:
                with self._cond:
                    for p in group:
                        p.done = True
                    self._busy = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _gather(self) -> list[_Pending]:
        """The next group (the oldest item's key, arrival order, at most ``max_batch_size``), taken off the queue;
        waits (lock held by the caller, released while waiting) until it is full or its oldest item has waited
        ``max_wait_s``."""
        while True:
            first = self._queue[0]
            group = [p for p in self._queue if p.key == first.key][: self.max_batch_size]
            left = first.arrived + self.max_wait_s - time.monotonic()
            if len(group) >= self.max_batch_size or left <= 0:
                break
            self._cond.wait(left)
        for p in group:
            self._queue.remove(p)
        return group

    def _run(self, group: list[_Pending]) -> None:
        try:
            outcomes = list(self.run_batch([p.item for p in group]))
            if len(outcomes) != len(group):
                raise RuntimeError(f"run_batch returned {len(outcomes)} outcomes for {len(group)} items")
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request, raised in its own thread
            outcomes = [exc] * len(group)
        for p, outcome in zip(group, outcomes):
            if isinstance(outcome, BaseException):
                p.error = outcome
            else:
                p.result = outcome
