"""Fixtures of the fuzz suite: the session's :class:`Figures`, a short-context tiny model, a private tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import CORPUS, tiny_config
from tests.fuzz.harness import Figures

#: The fuzz model's context: a valid call generates at most this many positions, so every case is quick.
CONTEXT = 96


@pytest.fixture(scope="session")
def figures():
    """The session's figures; written to ``$TASKMLLM_FUZZ_REPORT`` (JSON) at the end. In a ``long`` run, any
    untyped exception or hang recorded fails the session here, after every case ran."""
    figures = Figures()
    yield figures
    report = figures.report()
    if os.environ.get("TASKMLLM_FUZZ_REPORT"):
        Path(os.environ["TASKMLLM_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    if figures.collect and (figures.untyped or figures.hangs):
        pytest.fail(f"{len(figures.untyped)} untyped exception(s), {len(figures.hangs)} hang(s): "
                    f"{(figures.untyped + figures.hangs)[:5]}")


@pytest.fixture(scope="session")
def fuzz_tokenizer():
    """A tokenizer of the fuzz suite's own (config fuzzing may add task tokens: the shared one stays as it is)."""
    from taskmllm.model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, vocab_size=400, tasks=("seg", "det", "track"))


@pytest.fixture(scope="session")
def fuzz_pipeline(fuzz_tokenizer):
    """A random tiny JointModel whose LLM holds :data:`CONTEXT` positions, as a Pipeline."""
    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.router.joint import JointModel
    from taskmllm.router.pipeline import Pipeline

    cfg = tiny_config(fuzz_tokenizer)
    cfg.llm["max_position_embeddings"] = CONTEXT
    torch.manual_seed(0)
    return Pipeline(JointModel.build(TaskMLLM(cfg, fuzz_tokenizer)))
