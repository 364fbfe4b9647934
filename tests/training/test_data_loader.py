"""The training DataLoader: deterministic per-epoch order, per-rank shards, workers that change nothing, resume
that continues with the next unseen samples (the sample ids are the dataset indices each micro-batch carries)."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from taskmllm.training.config import load_config
from taskmllm.training.data_loader import build_loader, micro_batch_indices
from taskmllm.training.train import CLOCK_KEYS, build_dataset, build_joint, train
from tests.training.helpers import RECIPE, overrides

N = 24  # dataset length: 3 micro-batches of 4 per rank and epoch with 2 ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(RECIPE / "joint.yaml", overrides(tmp_path_factory.mktemp("loader"), f"--data.length={N}"))
    return cfg, build_dataset(cfg), build_joint(cfg).mllm.processor


def ids(loader, count: int) -> list[list[int]]:
    return [micro.indices for micro in islice(iter(loader), count)]


def test_every_epoch_is_a_new_permutation_split_between_the_ranks():
    per_rank = [[i for p in range(3) for i in micro_batch_indices(N, 4, 0, p, r, 2)] for r in range(2)]
    first = per_rank[0] + per_rank[1]
    assert sorted(first) == list(range(N))  # one epoch: every sample once, the two ranks disjoint
    second = [i for p in range(3, 6) for r in range(2) for i in micro_batch_indices(N, 4, 0, p, r, 2)]
    assert sorted(second) == list(range(N)) and second != [i for p in range(3) for r in range(2)
                                                           for i in micro_batch_indices(N, 4, 0, p, r, 2)]
    assert micro_batch_indices(N, 4, 0, 0, 0, 2) == micro_batch_indices(N, 4, 0, 0, 0, 2)  # a pure function


def test_workers_change_nothing(setup):
    cfg, data, processor = setup
    inline = list(islice(iter(build_loader(data, processor, 4, 0, 0, 1, 0, workers=0)), 3))
    workers = list(islice(iter(build_loader(data, processor, 4, 0, 0, 1, 0, workers=2)), 3))
    assert [m.indices for m in inline] == [m.indices for m in workers]
    for a, b in zip(inline, workers):
        assert len(a.groups) == len(b.groups)
        for ga, gb in zip(a.groups, b.groups):
            assert torch.equal(ga.batch.input_ids, gb.batch.input_ids) and ga.tokens == gb.tokens
            assert torch.equal(ga.batch.pixel_values, gb.batch.pixel_values)


def test_an_interrupted_loader_resumes_with_the_next_unseen_samples(setup):
    """Read 4 micro-batches, stop (the workers die with the loader), start again at position 4: the ids read are
    exactly those of one uninterrupted loader, into the second epoch."""
    _, data, processor = setup
    whole = ids(build_loader(data, processor, 4, 0, 0, 1, 0, workers=2), 9)
    first = ids(build_loader(data, processor, 4, 0, 0, 1, 0, workers=2), 4)
    rest = ids(build_loader(data, processor, 4, 0, 0, 1, 4, workers=2), 5)
    assert first + rest == whole
    assert sorted(i for m in whole[:6] for i in m) == list(range(N))  # the first epoch, then the second


def test_a_resumed_run_reads_on_from_its_checkpoint(tmp_path):
    """A run stopped after 2 steps of 2 accumulated micro-batches recorded data position 4; resuming from it
    trains steps 3-4 exactly as the uninterrupted run does (same logged losses)."""
    common = ["--grad_accum=2", "--save_every=1", "--keep_last=4", f"--data.length={N}"]
    full = tmp_path / "full"
    train(load_config(RECIPE / "joint.yaml", overrides(full, "--max_steps=4", *common)))
    state = json.loads((full / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["data_position"] == 4
    resumed = tmp_path / "resumed"
    resume = f"--resume={full / 'checkpoints' / 'step-00000002'}"
    train(load_config(RECIPE / "joint.yaml", overrides(resumed, "--max_steps=4", resume, *common)))
    want = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()][2:]
    got = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [3, 4]
    # with the loading in the training process (workers 0) each step waits for its batch: logged, within the step
    assert all(0 < r["data_wait_s"] <= r["time_s"] for r in got + want)
    for a, b in zip(got, want):
        assert ({k: v for k, v in a.items() if k not in CLOCK_KEYS}
                == {k: v for k, v in b.items() if k not in CLOCK_KEYS})
