"""The long fuzz run (``make fuzz``): over 10,000 generated inputs across every public boundary, as JSON.

Runs ``tests/fuzz`` with the ``long`` hypothesis profile in a child process whose data segment is capped
(``RLIMIT_DATA``, 8 GiB by default: an allocation past it is a ``MemoryError``/``RuntimeError`` the harness counts
as an untyped exception, not a machine brought down), each case bounded to 30 s. Prints (and with ``--out``
writes) the figures: cases per area, typed errors by class, untyped exceptions, hangs, peak memory, wall time.

    python bench/fuzz.py --out bench/results/fuzz.json        # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-gb", type=float, default=8.0, help="data-segment cap of the fuzzing process")
    parser.add_argument("--profile", default="long", choices=["long", "ci"], help="hypothesis profile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    limit = int(args.memory_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    with tempfile.TemporaryDirectory() as tmp:
        report_file = Path(tmp) / "fuzz.json"
        env = {**os.environ, "TASKMLLM_FUZZ": args.profile, "TASKMLLM_FUZZ_REPORT": str(report_file),
               "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz",
                               "--timeout=0"], cwd=ROOT, env=env, preexec_fn=cap)
        report = json.loads(report_file.read_text()) if report_file.is_file() else {"error": "no report written"}
    report.update(memory_cap_gb=args.memory_gb, pytest_exit_code=proc.returncode,
                  passed=proc.returncode == 0 and report.get("untyped_exceptions") == 0 and report.get("hangs") == 0)
    emit(report, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
