"""Argument types of the ``taskmllm`` console script, its one-line error parser, and how a command's errors end.

Each type turns a flag's text into a checked value or raises ``argparse.ArgumentTypeError`` with a message
naming what was wrong (``--port 70000`` -> "must be a port number in 1..65535, got 70000"); :class:`OneLineParser`
prints such errors as one line (no usage block) and exits with code 2. :func:`run_command` runs a subcommand and
turns every exception into one line on stderr and an exit code, the traceback of an unexpected one into a log file.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import math
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

#: Where the traceback of an unexpected error goes (the directory; ``TASKMLLM_LOG_DIR`` overrides it).
LOG_DIR_ENV = "TASKMLLM_LOG_DIR"
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``taskmllm predict: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
        sys.exit(2)


def one_line(message: object, limit: int = 600) -> str:
    """``message`` with its whitespace (newlines included) collapsed, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def positive_int(text: str) -> int:
    """An integer >= 1 (a count)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    return _int_in(text, low, None, f"an integer >= {low}")


def _int_in(text: str, low: int, high: Optional[int], expected: str) -> int:
    """``text`` as an integer in ``[low, high]`` (``high`` None: no upper bound), else an error saying it must be
    ``expected``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1..65535."""
    return _int_in(text, 1, 65535, "a port number in 1..65535")


def check_host(text: str) -> str:
    """An IPv4/IPv6 address or a host name (``localhost``, ``0.0.0.0``); ``999.1.1.1`` is neither."""
    looks_numeric = bool(re.fullmatch(r"[\d.]+", text)) or ":" in text
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        if not looks_numeric and _HOSTNAME.fullmatch(text):
            return text
    raise argparse.ArgumentTypeError(f"must be an IP address (127.0.0.1, 0.0.0.0, ::1) or a host name, got {text!r}")


def device_name(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if text == "cpu":  # the default: no need to import torch to know it exists
        return text
    from taskmllm.errors import ConfigError
    from taskmllm.model.devices import check_device

    try:
        check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def report_unexpected(exc: BaseException, argv: Optional[Sequence[str]]) -> Optional[Path]:
    """Write ``exc``'s traceback (with the command line) to a new log file; returns its path, or None when no
    log could be written."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "taskmllm-logs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"taskmllm-{stamp}-{os.getpid()}.log"
        command = " ".join(["taskmllm", *(sys.argv[1:] if argv is None else argv)])
        path.write_text(f"command: {command}\n\n" + "".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                argv: Optional[Sequence[str]] = None) -> int:
    """``func(args)``'s exit code; never a traceback on the terminal.

    0: done. 2: a project error (``TaskMLLMError``: bad input, config, checkpoint, ...) or a file-system error —
    one line on stderr naming the problem. 130: interrupted. 1: an unexpected exception — one line on stderr with
    the path of a log file holding its traceback (``$TASKMLLM_LOG_DIR`` or the temp directory).
    """
    from taskmllm.errors import TaskMLLMError

    try:
        return func(args)
    except (TaskMLLMError, OSError) as exc:  # OSError: a file the command reads or writes, the disk, permissions
        print(f"taskmllm: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taskmllm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback on the terminal
        log = report_unexpected(exc, argv)
        where = f"traceback in {log}" if log is not None else "no log could be written"
        print(f"taskmllm: internal error: {type(exc).__name__}: {one_line(exc, 300)} ({where}; please report it)",
              file=sys.stderr)
        return 1


def check_outputs(file: Optional[str] = None, folder: Optional[str] = None, what: str = "") -> None:
    """An output argument checked before the command imports its (heavy) library: the answer comes at once.
    The library functions check the same paths again for their Python callers."""
    from taskmllm.model.io import check_output_dir, check_output_file

    if file is not None:
        check_output_file(file, what)
    if folder is not None:
        check_output_dir(folder, what)
