"""The GPU suite (``make test-gpu``): what only a CUDA device can show. Every test is marked ``gpu`` and skips,
naming the reason, where CUDA is absent (the default suite deselects them).

- ``Pipeline`` with every expert on ``cuda``: fp32 answers as recorded on the CPU, bf16 answers (weights loaded
  straight into bf16) equal to fp32 within tolerance on the fixed prompt set of ``tests/recorded``;
- one step of every ``tiny`` stage on ``cuda`` in bf16 (full-size model, DataLoader workers, pinned memory);
- ``torchrun`` with NCCL (2 processes where 2 GPUs exist, else 1): DDP matches one process;
- DeepSpeed ZeRO-2 and ZeRO-3, one step each in bf16;
- the peak memory per GPU of each run is printed (``pytest -s``; ``memory.rank<r>.json`` beside each run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.recorded.prompts import answers, assert_like, assert_same
from tests.training.helpers import RECIPE, STAGES, overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU suite needs one")]

RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "tiny_answers.json"
GPUS = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def print_memory(out: Path, label: str) -> list[dict]:
    """Each rank's ``memory.rank<r>.json``, printed as one line per GPU."""
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("memory.rank*.json"))]
    for r in ranks:
        print(f"[{label}] rank {r['rank']}/{r['world']} {r['engine']}: peak "
              f"{r.get('peak_cuda_bytes', 0) / 2**20:.1f} MiB on the GPU; trainable {r['trainable_numel']:,}, "
              f"held params {r['param_numel']:,}, grads {r['grad_numel']:,}, "
              f"partition grads {r.get('grad_partition_numel', '-')}")
    return ranks


# ----------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def fp32_answers():
    """fp32 answers on the GPU, with cuDNN's TF32 convolutions off (the tower is a CNN: TF32 is not fp32)."""
    from taskmllm.router.pipeline import Pipeline

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return answers(Pipeline.from_pretrained("tiny", device="cuda"))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def test_pipeline_on_cuda_answers_as_recorded_on_the_cpu(fp32_answers):
    """Every expert (seg, det, track) runs on the GPU; the answers are the recorded CPU ones."""
    want = json.loads(RECORDED.read_text())
    for kind in ("single", "batched"):
        for i, (g, w) in enumerate(zip(fp32_answers[kind], want[kind])):
            try:
                assert_same(g, w)
            except AssertionError as exc:
                pytest.fail(f"{kind} request {i} ({want['prompts'][i]!r}): {exc}")


def test_pipeline_in_bf16_answers_like_fp32(fp32_answers):
    """bf16 weights (read straight into bf16): the same text for at least 11 of the 13 requests and, where the text
    agrees, masks within IoU 0.85, boxes within 4 px, scores within 0.05."""
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    got = answers(pipe)["single"]
    assert_like(got, fp32_answers["single"], min_same=11)


# ----------------------------------------------------------------------------------------------- training
FULL = ["--model.init=tiny", "--max_steps=1", "--save_every=1", "--precision=bf16", "--device=auto",
        "--data.batch_size=4", "--data.workers=2", "--progress=false"]


@pytest.mark.parametrize("stage", STAGES)
def test_one_bf16_step_of_every_tiny_stage(tmp_path, stage):
    """The full-size tiny model, fresh, on the GPU in bf16: a finite loss, pinned batches from 2 workers."""
    from taskmllm.training.config import load_config
    from taskmllm.training.train import train

    train(load_config(RECIPE / f"{stage}.yaml", FULL + [f"--out_dir={tmp_path}"]))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["loss_weighted"]) and np.isfinite(row["grad_norm"])
    print_memory(tmp_path, f"{stage} bf16")


def launch(out: Path, *extra: str, steps: int = 3) -> None:
    """``torchrun --nproc-per-node GPUS -m taskmllm.cli train joint.yaml`` on the GPUs (NCCL)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(GPUS),
           "-m", "taskmllm.cli", "train", str(RECIPE / "joint.yaml"),
           *overrides(out, f"--max_steps={steps}", f"--save_every={steps}", "--device=auto",
                      "--stage.lora.dropout=0.0", *extra)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_torchrun_nccl_ddp_matches_one_process(tmp_path):
    """DDP over NCCL (one rank per GPU) against one process with the same micro-batches, fp32; on one GPU the
    launcher still runs DDP over one rank."""
    from taskmllm.training.config import load_config
    from taskmllm.training.train import train

    launch(tmp_path / "ddp", "--precision=fp32", "--data.batch_size=2", "--grad_accum=1")
    ranks = print_memory(tmp_path / "ddp", "ddp nccl fp32")
    assert all(r["engine"] == "DDPTrainer" for r in ranks)
    ref = tmp_path / "ref"
    train(load_config(RECIPE / "joint.yaml", overrides(ref, "--max_steps=3", "--save_every=3", "--device=cuda",
                                                        "--precision=fp32", "--stage.lora.dropout=0.0",
                                                        "--data.batch_size=2", f"--grad_accum={GPUS}")))
    a = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        assert x["loss_weighted"] == pytest.approx(y["loss_weighted"], rel=1e-3)


@pytest.mark.parametrize("zero", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_one_bf16_step(tmp_path, zero):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    launch(tmp_path, "--precision=bf16", "--data.batch_size=2", f"--deepspeed={RECIPE / zero}", steps=1)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["loss_weighted"])
    ranks = print_memory(tmp_path, f"{zero} bf16")
    assert all(r["zero_stage"] == int(zero[7]) for r in ranks)
    if zero == "ds_zero2.json" and GPUS == 2:  # the gradients are partitioned between the two ranks
        assert all(r["grad_partition_numel"] <= 0.5 * r["trainable_numel"] + 16 for r in ranks)
