"""Router on hand-built token sequences, and the same states from teacher forcing and generation."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import UnknownTaskError
from taskmllm.router.router import Router, group_calls

TASKS = {"seg": 1, "det": 4, "track": 1}


@pytest.fixture()
def router(tokenizer):
    return Router(tokenizer, TASKS)


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_hand_built_batch(tokenizer, router):
    texts = [
        "Sure, <ref>the red circle</ref><seg><query> and <ref>hexagons</ref><det><query><query><query><query>.",
        "No task here, even <seg> typed without queries.",
        "<ref>the yellow heart</ref><track><query><seg><query>",
    ]
    rows = [_ids(tokenizer, t) for t in texts]
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])  # left padded
    mask = (torch.arange(length)[None] >= torch.tensor([length - len(r) for r in rows])[:, None]).long()
    hidden = torch.arange(ids.numel() * 3, dtype=torch.float).view(*ids.shape, 3)
    calls = router.route(ids, hidden, mask)
    assert [(c.task, c.sample, c.phrase) for c in calls] == [
        ("seg", 0, "the red circle"), ("det", 0, "hexagons"), ("track", 2, "the yellow heart"), ("seg", 2, None)]
    for call in calls:
        row = rows[call.sample]
        offset = length - len(row)
        k = TASKS[call.task]
        assert row[call.position] == tokenizer.convert_tokens_to_ids(f"<{call.task}>")
        want = hidden[call.sample, offset + call.position + 1: offset + call.position + 1 + k]
        assert call.query_states.shape == (k, 3) and torch.equal(call.query_states, want)
    assert list(group_calls(calls)) == ["seg", "det", "track"]


def test_no_calls(tokenizer, router):
    ids = torch.tensor([_ids(tokenizer, "Yes, there is a red circle.")])
    assert router.route(ids, torch.zeros(*ids.shape, 4)) == []


def test_checkpoint_task_without_expert(router):
    with pytest.raises(UnknownTaskError, match="<track>.*no registered expert"):
        router.check_tasks(["seg", "det"])


def test_teacher_forced_and_generation_paths_route_identical_states(overfit):
    """Generate, then teacher-force prompt + generated ids: the router returns the same calls and states."""
    model, prompts, images, _ = overfit
    router = Router(model.tokenizer, model.config.tokens.tasks)
    out = model.generate(model.processor(prompts, images), max_new_tokens=24)
    gen_calls = router.route_generation(out)
    assert [c.task for c in gen_calls] == ["seg", "det"]
    rows = [model.processor(p, i).input_ids[0].tolist() + s for p, i, s in zip(prompts, images, out.sequences)]
    length = max(map(len, rows))
    batch = model.processor(prompts, images)
    batch.input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    batch.attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        forced = router.route(batch.input_ids, model(batch).hidden_states, batch.attention_mask)
    assert [(c.task, c.sample, c.phrase) for c in forced] == [(c.task, c.sample, c.phrase) for c in gen_calls]
    for f, g in zip(forced, gen_calls):
        assert torch.allclose(f.query_states, g.query_states, atol=1e-4)
