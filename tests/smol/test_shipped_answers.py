"""The shipped ``smol`` answers a fixed set of requests exactly as recorded when it was shipped (re-recorded with
``python -m tests.recorded.prompts smol tests/recorded/smol_answers.json`` whenever a new smol is shipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recorded.prompts import answers, assert_same
from tests.smol.conftest import require_smol_packages

require_smol_packages()
RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "smol_answers.json"


def test_smol_answers_as_recorded():
    from taskmllm.router.pipeline import Pipeline

    want = json.loads(RECORDED.read_text())
    got = answers(Pipeline.from_pretrained("smol"))
    for kind in ("single", "batched"):
        for i, (g, w) in enumerate(zip(got[kind], want[kind], strict=True)):
            try:
                assert_same(g, w)
            except AssertionError as exc:
                pytest.fail(f"{kind} request {i} ({want['prompts'][i]!r}): {exc}")
