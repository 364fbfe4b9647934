"""The shipped ``tiny`` answers a fixed set of requests exactly as recorded before the architecture refactor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recorded.prompts import answers, assert_same

RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "tiny_answers.json"


def test_tiny_answers_as_recorded():
    from taskmllm.router.pipeline import Pipeline

    want = json.loads(RECORDED.read_text())
    got = answers(Pipeline.from_pretrained("tiny"))
    assert got["prompts"] == want["prompts"]
    for kind in ("single", "batched"):
        assert len(got[kind]) == len(want[kind])
        for i, (g, w) in enumerate(zip(got[kind], want[kind])):
            try:
                assert_same(g, w)
            except AssertionError as exc:
                pytest.fail(f"{kind} request {i} ({want['prompts'][i]!r}): {exc}")
