"""``Pipeline`` with bf16 weights on the CPU: every expert runs (the SAM positional encoding once failed on a cast
model: fp32 grid against a bf16 matrix) and the answers match the recorded fp32 ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.recorded.prompts import assert_like, record, requests

RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "tiny_answers.json"


def test_tiny_in_bf16_answers_like_the_recorded_fp32():
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("tiny", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    got = [record(pipe(v, p, max_new_tokens=48)) for v, p in requests()]
    assert any(call.get("mask_rle") for r in got for call in r["calls"]), "no segmentation call ran"
    assert_like(got, json.loads(RECORDED.read_text())["single"], min_same=11)
