"""The fuzz harness: hypothesis settings per profile, the per-case guard and the run's figures.

Profiles (``TASKMLLM_FUZZ``): ``ci`` (default: a few hundred cases in all, derandomized, part of ``make test``)
and ``long`` (``make fuzz``: over 10,000 cases, random; ``TASKMLLM_FUZZ_SCALE`` multiplies the counts). Every case runs under :meth:`Figures.run`: a typed error
of the project (``TaskMLLMError``) is an accepted outcome, any other exception is a failure, and a case that runs
past :data:`CASE_SECONDS` is a hang. In ``long`` runs every failure is recorded (the run goes on and fails at the
end, listing them); in ``ci`` runs the first one fails its test at once, so hypothesis shrinks it.
"""

from __future__ import annotations

import _thread
import os
import resource
import signal
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from hypothesis import HealthCheck, settings

from taskmllm.errors import TaskMLLMError

PROFILE = os.environ.get("TASKMLLM_FUZZ", "ci")
#: Multiplies the ``long`` profile's case counts (a shorter or longer ``make fuzz``).
SCALE = float(os.environ.get("TASKMLLM_FUZZ_SCALE", "1"))
#: The wall-clock bound of one case.
CASE_SECONDS = 30.0


def fuzz_settings(ci: int, long: int) -> settings:
    """Hypothesis settings of a fuzz test: ``ci`` cases in the default suite, ``long`` under ``make fuzz``."""
    is_long = PROFILE == "long"
    return settings(max_examples=max(1, round(long * SCALE)) if is_long else ci, deadline=None, database=None, derandomize=not is_long,
                    suppress_health_check=list(HealthCheck), print_blob=True)


class CaseTimeout(BaseException):
    """A case ran past :data:`CASE_SECONDS` (a BaseException: no ``except Exception`` in the code swallows it)."""


class UntypedError(AssertionError):
    """An exception other than the project's typed errors escaped a public boundary."""


def _alarm(signum, frame):
    raise CaseTimeout(f"the case ran past {CASE_SECONDS:g} s")


@dataclass
class Figures:
    """What a fuzz session saw: cases, typed errors by class, untyped exceptions, hangs, peak memory."""

    collect: bool = PROFILE == "long"
    cases: Counter = field(default_factory=Counter)
    accepted: int = 0
    typed: Counter = field(default_factory=Counter)
    untyped: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    slowest_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def run(self, area: str, call: Callable[[], object], describe: Callable[[], str] = lambda: "") -> None:
        """Run one case of ``area``; see the module docstring for what counts as a failure."""
        self.cases[area] += 1
        previous = signal.signal(signal.SIGUSR1, _alarm)  # not SIGALRM: pytest-timeout's own timer stays armed
        watchdog = threading.Timer(CASE_SECONDS, _thread.interrupt_main, args=(signal.SIGUSR1,))
        watchdog.start()
        start = time.perf_counter()
        try:
            call()
            self.accepted += 1
        except TaskMLLMError as exc:
            self.typed[type(exc).__name__] += 1
        except CaseTimeout:
            self.hangs.append(f"{area}: {describe()}")
            if not self.collect:
                raise UntypedError(f"{area}: a case ran past {CASE_SECONDS:g} s: {describe()}") from None
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.untyped.append(f"{area}: {type(exc).__name__}: {exc} at {where.filename}:{where.lineno} "
                                f"({describe()})"[:800])
            if not self.collect:
                raise UntypedError(f"{area}: untyped {type(exc).__name__}: {exc}") from exc
        finally:
            watchdog.cancel()
            signal.signal(signal.SIGUSR1, previous)
            self.slowest_s = max(self.slowest_s, time.perf_counter() - start)

    def report(self) -> dict:
        """The figures as JSON-ready data."""
        return {"profile": PROFILE, "cases": sum(self.cases.values()), "cases_by_area": dict(self.cases),
                "accepted": self.accepted, "typed_errors": sum(self.typed.values()),
                "typed_by_class": dict(self.typed), "untyped_exceptions": len(self.untyped),
                "untyped": self.untyped[:50], "hangs": len(self.hangs), "hang_cases": self.hangs[:20],
                "case_bound_s": CASE_SECONDS, "slowest_case_s": round(self.slowest_s, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "wall_s": round(time.perf_counter() - self.started, 1)}
