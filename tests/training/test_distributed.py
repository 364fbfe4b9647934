"""Two gloo processes (torchrun DDP, DeepSpeed ZeRO-2, ZeRO-3) train exactly like one process with the same global
batch.

The oracle is a single-process run of the same global batch made of the same micro-batches: world 1 with
``grad_accum`` = 2x the per-rank ``grad_accum``. A single batch of 2x the size would be a *different* objective:
the LM loss is a per-token mean and each expert's loss a mean over its calls, so the mean of two half-batch
losses (what data parallelism and gradient accumulation both compute) differs from the loss of the whole batch.
The data order makes the micro-batches identical: rank ``r`` of ``w`` at position ``p`` reads samples
``(p*w + r)*bs ...``, which is micro-batch ``p*w + r`` of a single process (checked directly below).
LoRA dropout is 0 and precision fp32, so nothing random or rounded differs between the runs. With batches of one
sample most steps have an expert called on one rank and not on the other (checked): every expert still runs on
every rank (a zero-weight placeholder call), so no collective is missed and the gradients are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskmllm.training.config import load_config
from taskmllm.training.data_loader import micro_batch_indices
from taskmllm.training.train import CLOCK_KEYS, build_dataset, train
from tests.training.helpers import RECIPE, overrides

STAGE = RECIPE / "joint.yaml"  # projector, LLM, queries and every expert train
COMMON = ["--max_steps=3", "--save_every=3", "--stage.lora.dropout=0.0", "--precision=fp32", "--device=cpu"]
TOL = 1e-5


def run_config(out: Path, batch: int, accum: int, *extra: str) -> list[str]:
    return overrides(out, *COMMON, f"--data.batch_size={batch}", f"--grad_accum={accum}", *extra)


def reference(root: str, batch: int, accum: int) -> Path:
    """The single-process oracle, run in this process."""
    out = Path(root) / f"ref-b{batch}-a{accum}"
    if not (out / "final").is_dir():  # shared by the tests of one module
        train(load_config(STAGE, run_config(out, batch, accum)))
    return out


def torchrun(out: Path, batch: int, accum: int, extra: tuple[str, ...] = ()) -> None:
    """``torchrun --nproc-per-node 2 -m taskmllm.cli train ...`` on CPU (gloo), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "taskmllm.cli", "train", str(STAGE), *run_config(out, batch, accum, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the exported ``final/`` model (MLLM and experts), keyed by file and name."""
    final = out / "final"
    return {f"{f.parent.relative_to(final)}/{k}": v
            for f in sorted(final.rglob("model.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_training(got: Path, ref: Path) -> None:
    """Same steps, same per-step losses (every logged term), lr and grad norm; same final weights."""
    a, b = rows(got), rows(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert set(x) == set(y), f"step {y['step']}: logged terms differ"
        for key in sorted(set(y) - {"step", *CLOCK_KEYS}):
            tol = TOL * max(1.0, abs(y[key])) if key == "grad_norm" else TOL
            assert x[key] == pytest.approx(y[key], abs=tol), f"step {y['step']}: {key}"
    wa, wb = weights(got), weights(ref)
    assert wa.keys() == wb.keys()
    worst = max(wa, key=lambda k: float((wa[k] - wb[k]).abs().max()))
    assert torch.allclose(wa[worst], wb[worst], rtol=0, atol=TOL), worst


def test_two_ranks_read_the_single_process_micro_batches():
    n = 50  # positions past 50 samples wrap into a second, differently shuffled epoch

    def read(position: int, rank: int, world: int, batch: int) -> list:
        return micro_batch_indices(n, batch, 0, position, rank, world)

    for p in range(10):
        two_ranks = read(p, 0, 2, 3) + read(p, 1, 2, 3)
        assert two_ranks == read(2 * p, 0, 1, 3) + read(2 * p + 1, 0, 1, 3)  # 2 accumulated micro-batches
        assert two_ranks == read(p, 0, 1, 6)  # ... and one batch of twice the size


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("distributed"))


def memory(out: Path) -> list[dict]:
    """Each rank's ``memory.rank<r>.json``: element counts of the parameters and gradients it held at step 1."""
    return [json.loads((out / f"memory.rank{r}.json").read_text()) for r in range(2)]


def test_torchrun_ddp_matches_single_process(root):
    """2 ranks x batch 2 against 1 process x 2 micro-batches of 2; DDP keeps whole gradients on each rank."""
    out = Path(root) / "ddp"
    torchrun(out, batch=2, accum=1)
    assert_same_training(out, reference(root, batch=2, accum=2))
    for rank in memory(out):
        assert rank["engine"] == "DDPTrainer" and rank["grad_numel"] > 0.95 * rank["trainable_numel"]


def test_torchrun_ddp_with_fuller_calibration_matches_single_process(root):
    """``stage.grad_calibration: fuller`` under DDP: each rank calibrates its own micro-batch's task gradients
    and DDP averages the result, as one process accumulating the same micro-batches does (the gradient-norm
    terms it logs included)."""
    fuller = "--stage.grad_calibration=fuller"
    out, ref = Path(root) / "ddp-fuller", Path(root) / "ref-fuller-b2-a2"
    torchrun(out, batch=2, accum=1, extra=(fuller,))
    train(load_config(STAGE, run_config(ref, 2, 2, fuller)))
    assert any(k.startswith("gradnorm_") for k in rows(ref)[0])
    assert_same_training(out, ref)


@pytest.mark.slow  # ~1 min: two more 2-process runs
def test_deepspeed_zero2_with_fuller_calibration_matches_single_process(root):
    """FULLER under ZeRO-2: the calibrated scalar goes through ``engine.backward`` like the plain loss (each rank
    calibrates its micro-batches; the engine accumulates and averages)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'taskmllm[deepspeed]')")
    fuller = "--stage.grad_calibration=fuller"
    out, ref = Path(root) / "zero2-fuller", Path(root) / "ref-fuller-b1-a4"
    torchrun(out, batch=1, accum=2, extra=(f"--deepspeed={RECIPE / 'ds_zero2.json'}", fuller))
    train(load_config(STAGE, run_config(ref, 1, 4, fuller)))
    assert_same_training(out, ref)


def test_fuller_and_cached_calls_are_refused_under_zero3(tmp_path):
    """ZeRO-3 hangs on the per-task gradients taken inside the forward, and does not gather its parameters for the
    cached calls' frozen forward outside the engine: a typed error before the engine starts."""
    from taskmllm.errors import ConfigError
    from taskmllm.training.distributed import check_zero_stage

    cfg = load_config(STAGE, run_config(tmp_path, 1, 1, "--stage.grad_calibration=fuller",
                                        f"--deepspeed={RECIPE / 'ds_zero3.json'}"))
    with pytest.raises(ConfigError, match="fuller does not run under DeepSpeed ZeRO-3"):
        check_zero_stage(cfg, 3)
    check_zero_stage(cfg, 2)
    check_zero_stage(load_config(STAGE, run_config(tmp_path, 1, 1)), 3)  # none: ZeRO-3 as before
    cached = load_config(STAGE, run_config(tmp_path, 1, 1, "--stage.trainable={experts: full}", "--stage.lm_weight=0",
                                           "--stage.aux={}", "--stage.cached_calls=8"))
    with pytest.raises(ConfigError, match="cached_calls does not run under DeepSpeed ZeRO-3"):
        check_zero_stage(cached, 3)


def test_the_zero_runs_have_a_rank_without_an_expert_call(root):
    """The precondition of the ZeRO tests below, checked on their data: at batch 1 per rank, some micro-batch has
    an expert called on one rank and not on the other (those runs then show no hang and the same weights)."""
    cfg = load_config(STAGE, run_config(Path(root) / "data", 1, 2))
    data = build_dataset(cfg)
    lonely = []
    for position in range(6):  # 3 steps x 2 accumulated micro-batches
        tasks = [{t.task for i in micro_batch_indices(len(data), 1, cfg.seed, position, r, 2)
                  for t in data[i].targets} for r in range(2)]
        lonely += sorted(tasks[0] ^ tasks[1])
    assert lonely, "every micro-batch pair called the same experts: the test data no longer test this"


def test_deepspeed_zero2_matches_single_process(root):
    """2 ranks x 2 accumulated micro-batches of 1 under ZeRO-2 against 1 process x 4 micro-batches of 1.

    Per-rank gradient accumulation is part of the check (DeepSpeed must not divide the loss twice). ZeRO-2's
    gradient partitioning is in effect: after backward no parameter holds a gradient, and each rank holds the
    averaged gradient of its own half of the trainable parameters.
    """
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'taskmllm[deepspeed]')")
    out = Path(root) / "zero2"
    torchrun(out, batch=1, accum=2, extra=(f"--deepspeed={RECIPE / 'ds_zero2.json'}",))
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000003").glob("optimizer*")) == [
        "optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]  # the optimizer really was partitioned
    assert_same_training(out, reference(root, batch=1, accum=4))
    for rank in memory(out):
        assert rank["zero_stage"] == 2 and rank["grad_numel"] == 0
        assert rank["grad_partition_numel"] == pytest.approx(rank["trainable_numel"] / 2, abs=16)


def test_deepspeed_zero3_matches_single_process(root, tmp_path):
    """The same under ZeRO-3 with every parameter partitioned (no persistence threshold): each rank holds half of
    every parameter between forwards, gathers them where a module runs, and the checkpoint and the exported
    model gather them whole."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'taskmllm[deepspeed]')")
    ds = json.loads((RECIPE / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    out = Path(root) / "zero3"
    torchrun(out, batch=1, accum=2, extra=(f"--deepspeed={tmp_path / 'zero3.json'}",))
    assert_same_training(out, reference(root, batch=1, accum=4))
    total = sum(v.numel() for v in load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors")).values())
    for rank in memory(out):
        assert rank["zero_stage"] == 3 and rank["param_numel"] < 0.55 * total


@pytest.mark.slow  # ~50 s per stage: two more 2-process runs
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_matches_uninterrupted_run(tmp_path, stage):
    """Resuming a ZeRO run from its step-1 checkpoint ends bit-identical to the uninterrupted run (the fp32
    master weights ZeRO steps are refreshed from the loaded weights; each rank reloads its optimizer slice)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'taskmllm[deepspeed]')")
    ds = f"--deepspeed={RECIPE / f'ds_zero{stage}.json'}"
    torchrun(tmp_path / "full", batch=1, accum=1, extra=(ds, "--save_every=1", "--keep_last=3"))
    resume = f"--resume={tmp_path / 'full' / 'checkpoints' / 'step-00000001'}"
    torchrun(tmp_path / "resumed", batch=1, accum=1, extra=(ds, resume))
    full, resumed = rows(tmp_path / "full"), rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [2, 3]
    for x, y in zip(resumed, full[1:]):
        assert ({k: v for k, v in x.items() if k not in CLOCK_KEYS}
                == {k: v for k, v in y.items() if k not in CLOCK_KEYS})
    wa, wb = weights(tmp_path / "resumed"), weights(tmp_path / "full")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("device, local, want", [
    ("cuda", 1, torch.device("cuda", 1)),      # a bare `cuda` gets the rank's index (set_device needs one)
    ("cuda:0", 1, torch.device("cuda", 0)),    # an explicit index is kept
    ("cpu", 1, torch.device("cpu")),
])
def test_resolve_device_gives_cuda_an_index(device, local, want):
    from taskmllm.training.distributed import resolve_device

    assert resolve_device(device, local) == want


def test_resolve_device_auto_is_the_cpu_without_cuda(monkeypatch):
    from taskmllm.training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == torch.device("cpu")


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_a_cached_stage_runs_on_two_ranks(tmp_path, engine):
    """``stage.cached_calls`` under torchrun: each rank runs the frozen MLLM over its own shard of the stage's
    first samples (outside the engine's forward), then every rank runs
    every expert on each micro-batch of cached calls (a placeholder for an expert its draw misses)."""
    extra = ["--stage.trainable={experts: full}", "--stage.lm_weight=0", "--stage.aux={}", "--stage.cached_calls=24"]
    if engine == "zero2":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'taskmllm[deepspeed]')")
        extra.append(f"--deepspeed={RECIPE / 'ds_zero2.json'}")
    out = tmp_path / engine
    torchrun(out, batch=2, accum=1, extra=tuple(extra))
    stats = json.loads((out / "call_cache.json").read_text())
    assert stats["samples"] == 24 and all(stats["calls"].values())
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and all(r["loss_weighted"] > 0 for r in rows(out))
    assert all(torch.isfinite(v).all() for v in weights(out).values())
