"""The metric layer is importable from one module and stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_metrics_facade_exports() -> None:
    from taskmllm.eval import metrics

    for name in metrics.__all__:
        assert callable(getattr(metrics, name)), name


def test_eval_does_not_import_torch() -> None:
    code = ("import sys, taskmllm.eval.metrics, taskmllm.eval.report, taskmllm.eval.aggregate; "
            "bad = [m for m in ('torch', 'transformers', 'matplotlib.pyplot') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
