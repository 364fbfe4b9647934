"""``stage.cached_calls``: the experts train on calls the frozen MLLM computed once. The oracle is the live path:
on the same samples a cached micro-batch gives the live step's loss terms and gradients; the draw is a pure
function of the position (a resumed run equals an uninterrupted one); a stage that trains anything upstream of the
experts is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskmllm.errors import ConfigError
from taskmllm.training.call_cache import CallCache
from taskmllm.training.config import load_config
from taskmllm.training.data_loader import Collate
from taskmllm.training.train import build_trainee, train
from tests.training.helpers import RECIPE, TINY, overrides

EXPERTS_ONLY = ["--stage.trainable={experts: full}", "--stage.lm_weight=0", "--stage.aux={}"]


def _trainee_and_samples(tmp_path, n: int = 6):
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset

    cfg = load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--model.init=tiny", *EXPERTS_ONLY))
    trainee, _ = build_trainee(cfg, cfg.data.specs(), torch.device("cpu"))
    data = shapesworld_dataset({"seg": 1.0, "rec": 1.0, "det": 1.0, "track": 1.0}, n, seed=3,
                               config=WorldConfig(image_size=48, num_frames=2))
    return trainee, [data[i] for i in range(n)]


def _expert_grads(trainee) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in trainee.joint.experts.named_parameters() if p.grad is not None}
    trainee.zero_grad(set_to_none=True)
    return grads


def test_a_cached_micro_batch_is_the_live_one(tmp_path):
    """Every loss term and every expert gradient of the cached calls equal the live forward's on the same samples
    (eval mode: no dropout on either side; the cache is built in eval mode)."""
    trainee, samples = _trainee_and_samples(tmp_path)
    trainee.eval()
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    live_loss, live = trainee(micro)
    live_loss.backward()
    live_grads = _expert_grads(trainee)

    cache = CallCache.build(trainee.joint, iter([micro]), len(samples), trainee.active)
    assert set(cache.counts()) == {"seg", "det", "track"} and all(cache.counts().values())
    assert len(cache) == sum(len(s.targets) for s in samples)
    cached_loss, parts = trainee(cache.batch(range(len(cache))))
    cached_loss.backward()
    cached_grads = _expert_grads(trainee)

    assert set(parts) == set(live) and float(live_loss.detach()) > 0
    for name, value in live.items():
        assert float(parts[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    assert set(cached_grads) == set(live_grads)
    for name, grad in live_grads.items():
        assert torch.allclose(cached_grads[name], grad, rtol=1e-3, atol=1e-6), name


def test_an_expert_the_draw_misses_runs_as_a_zero_weight_placeholder(tmp_path):
    trainee, samples = _trainee_and_samples(tmp_path)
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    cache = CallCache.build(trainee.joint, iter([micro]), len(samples), trainee.active)
    seg_rows = [i for i, c in enumerate(cache.calls) if c.task == "seg"]
    batch = cache.batch(seg_rows)
    assert [(r.task, r.placeholder) for r in batch.runs] == [("seg", False), ("det", True), ("track", True)]
    loss, parts = trainee(batch)
    assert not any(k.startswith(("det", "track")) for k in parts)
    loss.backward()
    det = [p.grad for p in trainee.joint.experts["det"].parameters() if p.grad is not None]
    assert det and all(not g.any() for g in det)  # on the graph, exactly zero


def test_the_draw_is_a_pure_function_of_the_position(tmp_path):
    trainee, samples = _trainee_and_samples(tmp_path)
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    cache = CallCache.build(trainee.joint, iter([micro]), len(samples), trainee.active)
    stream = cache.batches(3, seed=1, start=0)
    first = [next(stream).indices for _ in range(len(cache))]
    assert next(cache.batches(3, seed=1, start=3)).indices == first[3]
    flat = [i for rows in first for i in rows]
    for epoch in range(3):  # each epoch visits every cached call once, in its own order
        assert sorted(flat[epoch * len(cache): (epoch + 1) * len(cache)]) == list(range(len(cache)))
    assert flat[: len(cache)] != flat[len(cache): 2 * len(cache)]


@pytest.mark.parametrize("extra, why", [
    (["--stage.trainable={experts: full, queries: full}"], "trains queries"),
    (["--stage.lm_weight=1.0"], "lm_weight"),
    (["--stage.aux={focus: {weight: 1.0}}"], "auxiliary losses"),
])
def test_a_stage_that_trains_upstream_is_refused(tmp_path, extra, why):
    with pytest.raises(ConfigError, match=why):
        load_config(RECIPE / "heads.yaml", overrides(tmp_path, *EXPERTS_ONLY, "--stage.cached_calls=8", *extra))


def test_a_cached_stage_trains_and_resumes_like_an_uninterrupted_run(tmp_path):
    """4 steps from the cache, and the same run resumed from its step-2 checkpoint in another directory: the same
    experts (the cache is rebuilt from the same samples, the draw continues from the checkpoint's position)."""
    steps = [*EXPERTS_ONLY, "--model.init=tiny", "--stage.cached_calls=6", "--data.batch_size=3", "--save_every=2",
             "--keep_last=2", "--max_steps=4"]
    ref = train(load_config(RECIPE / "heads.yaml", overrides(tmp_path / "ref", *steps)))
    resume = f"--resume={tmp_path / 'ref' / 'checkpoints' / 'step-00000002'}"
    run = train(load_config(RECIPE / "heads.yaml", overrides(tmp_path / "run", *steps, resume)))
    for name in ("seg", "det", "track"):
        a = load_file(str(ref / "experts" / name / "model.safetensors"))
        b = load_file(str(run / "experts" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()) == 4
    assert "loaded_from" not in json.loads((tmp_path / "run" / "call_cache.json").read_text())

    # a third run reads the first one's cache file instead of running the MLLM: the same experts again
    shared = f"--stage.cached_calls_dir={tmp_path / 'ref' / 'call_cache'}"
    again = train(load_config(RECIPE / "heads.yaml", overrides(tmp_path / "again", *steps, shared)))
    assert json.loads((tmp_path / "again" / "call_cache.json").read_text())["loaded_from"].startswith(str(tmp_path))
    for name in ("seg", "det", "track"):
        a = load_file(str(ref / "experts" / name / "model.safetensors"))
        b = load_file(str(again / "experts" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_saved_cache_reads_back_equal_and_only_for_its_key(tmp_path):
    trainee, samples = _trainee_and_samples(tmp_path)
    micro = Collate(trainee.joint.mllm.processor)(list(enumerate(samples)))
    cache = CallCache.build(trainee.joint, iter([micro]), len(samples), trainee.active)
    path = cache.save(tmp_path / "c" / "rank0-of-1.safetensors", "key-a")
    assert CallCache.load(path, "key-b") is None and CallCache.load(tmp_path / "none.safetensors", "key-a") is None
    back = CallCache.load(path, "key-a")
    assert (back.tasks, back.grid, back.image_size, back.visual_grid) == (
        cache.tasks, cache.grid, cache.image_size, cache.visual_grid)
    assert len(back) == len(cache)
    for a, b in zip(cache.calls, back.calls):
        assert (a.task, a.phrase, a.target.task, a.target.phrase) == (b.task, b.phrase, b.target.task, b.target.phrase)
        for name in ("queries", "features", "context", "pixels"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        for name in ("mask", "boxes", "visible", "prompt_box"):
            x, y = getattr(a.target, name), getattr(b.target, name)
            assert (x is None and y is None) or torch.equal(torch.as_tensor(x), y), name
    loss_a, _ = trainee(cache.batch(range(len(cache))))
    loss_b, _ = trainee(back.batch(range(len(back))))
    assert float(loss_a.detach()) == float(loss_b.detach())


def test_a_cache_is_found_by_the_checkpoint_content_and_never_overwritten(tmp_path):
    """Another path to the same checkpoint (a link) reads the cache; a cache given through ``cached_calls_dir``
    that was built for something else (here another call count) is refused, the file left as it was."""
    checkpoint = train(load_config(RECIPE / "heads.yaml", overrides(tmp_path / "ckpt", "--model.init=tiny",
                                                                    "--max_steps=1")))
    link = tmp_path / "link"
    link.symlink_to(checkpoint, target_is_directory=True)
    data_only = [o for o in TINY if not o.startswith("--model.")]  # a checkpoint carries its model's settings

    def stage(out: str, init: Path, *extra: str):
        return load_config(RECIPE / "heads.yaml", [*data_only, f"--out_dir={tmp_path / out}", f"--model.init={init}",
                                                   *EXPERTS_ONLY, "--stage.cached_calls=6", "--data.batch_size=3",
                                                   "--max_steps=1", *extra])

    train(stage("a", checkpoint))
    cache = tmp_path / "a" / "call_cache" / "rank0-of-1.safetensors"
    before = cache.read_bytes()
    shared = f"--stage.cached_calls_dir={cache.parent}"
    train(stage("b", link, shared))
    assert json.loads((tmp_path / "b" / "call_cache.json").read_text())["loaded_from"] == str(cache)

    with pytest.raises(ConfigError, match="was built for another model, data, call count"):
        train(stage("c", link, shared, "--stage.cached_calls=5"))
    assert cache.read_bytes() == before


def test_an_interrupted_build_resumes_where_its_last_saved_part_ended(tmp_path):
    """A build killed after two of three micro-batches leaves two parts; a new build resumes from them (the loader
    started at micro-batch 2) and ends with the calls of an uninterrupted build, tensor for tensor; the parts are
    deleted once the whole cache is saved, and another key's parts are neither read nor touched."""
    from taskmllm.training.call_cache import BuildState, CacheParts

    trainee, samples = _trainee_and_samples(tmp_path)
    collate = Collate(trainee.joint.mllm.processor)
    micros = [collate(list(enumerate(samples))[i:i + 2]) for i in (0, 2, 4)]
    whole = CallCache.build(trainee.joint, iter(micros), len(samples), trainee.active)

    def killed_after_two():
        yield from micros[:2]
        raise RuntimeError("killed")

    folder = tmp_path / "c"
    other = CacheParts(folder, "rank0-of-1", "key-b", every_s=0)
    other.save(BuildState(calls=list(whole.calls[:1]), seen=2, position=1), 1.0)
    parts = CacheParts(folder, "rank0-of-1", "key-a", every_s=0)
    with pytest.raises(RuntimeError, match="killed"):
        CallCache.build(trainee.joint, killed_after_two(), len(samples), trainee.active, parts=parts)
    assert len(parts.files()) == 2

    again = CacheParts(folder, "rank0-of-1", "key-a", every_s=0)
    state = again.resume()
    assert (state.seen, state.position) == (4, 2) and state.seconds > 0
    cache = CallCache.build(trainee.joint, iter(micros[state.position:]), len(samples), trainee.active,
                            parts=again, state=state)
    assert cache.stats["resumed_at_sample"] == 4 and cache.stats["samples"] == len(samples)
    assert len(cache) == len(whole) and len(whole) > 2
    for a, b in zip(whole.calls, cache.calls):
        assert (a.task, a.phrase, a.target.phrase) == (b.task, b.phrase, b.target.phrase)
        for name in ("queries", "features", "context", "pixels"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    again.clear()
    assert again.files() == [] and len(other.files()) == 1
    assert CacheParts(folder, "rank0-of-1", "key-a").resume().seen == 0  # nothing left to resume from
