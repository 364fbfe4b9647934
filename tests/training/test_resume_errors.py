"""Resume after SIGKILL equals an uninterrupted run; saves are atomic; bad input fails before compute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.training.checkpoint import Checkpointer
from taskmllm.training.config import load_config
from taskmllm.training.train import build_dataset, train
from tests.training.helpers import RECIPE, overrides

STEPS = ["--max_steps=6", "--save_every=1", "--keep_last=2"]


@pytest.mark.slow  # ~60 s: a reference run plus two subprocess runs
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    ref = train(load_config(RECIPE / "joint.yaml", overrides(tmp_path / "ref", *STEPS)))
    cmd = [sys.executable, "-m", "taskmllm.cli", "train", str(RECIPE / "joint.yaml"),
           *overrides(tmp_path / "run", *STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = Checkpointer(tmp_path / "run" / "checkpoints", 2)
    deadline = time.time() + 120
    while (ckpts.latest() is None or ckpts.latest().name < "step-00000003") and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run" / "final").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert len(ckpts.list()) == 2  # keep-last-N


def test_interrupted_save_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    cfg = load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--max_steps=1", "--save_every=1"))
    train(cfg)
    real = safetensors.torch.save_file

    def crash(*args, **kwargs):
        real(*args, **kwargs)  # the file is written, then the process "dies" mid-save
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    cfg = load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--max_steps=2", "--save_every=1"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    ckpts = Checkpointer(tmp_path / "checkpoints", 2)
    assert [p.name for p in ckpts.list()] == ["step-00000001"]
    assert sorted(f.name for f in ckpts.latest().iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json", "train_config.yaml"]
    final = train(cfg)  # resumes from step 1 and finishes
    assert final.is_dir() and [p.name for p in ckpts.list()] == ["step-00000001", "step-00000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_unknown_key_suggests_and_types_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.l'.*did you mean 'lr'"):
        load_config(RECIPE / "heads.yaml", ["--optim.l=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'max_step'.*'max_steps'"):
        load_config(RECIPE / "heads.yaml", ["--max_step=3"])
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_config(RECIPE / "heads.yaml", ["--max_steps=abc"])
    with pytest.raises(ConfigError, match="precision.*not one of"):
        load_config(RECIPE / "heads.yaml", ["--precision=fp8"])
    cfg = load_config(RECIPE / "heads.yaml", ["--optim.lr=1", "--stage.trainable.experts.seg=frozen"])
    assert cfg.optim.lr == 1.0 and cfg.stage.trainable["experts.seg"] == "frozen"


def test_data_world_overrides_the_scenes_and_is_checked():
    shapes = "--data.sources.shapes"
    cfg = load_config(RECIPE / "heads.yaml", [f"{shapes}.world.max_objects=1", f"{shapes}.world.cooccurrence=[]",
                                              f"{shapes}.mix={{exist: 1.0}}"])
    data = build_dataset(cfg)
    assert [len(data[i].objects) for i in range(8)] == [1] * 8
    assert max(len(build_dataset(load_config(RECIPE / "heads.yaml", [f"{shapes}.mix={{exist: 1.0}}"]))[i].objects)
               for i in range(8)) > 1
    with pytest.raises(ConfigError, match="data.sources.shapes: world: unknown key 'max_object'.*did you mean "
                                          "'max_objects'"):
        load_config(RECIPE / "heads.yaml", [f"{shapes}.world.max_object=1"])
    with pytest.raises(ConfigError, match="world.image_size: set image_size beside world instead"):
        load_config(RECIPE / "heads.yaml", [f"{shapes}.world.image_size=64"])
    with pytest.raises(ConfigError, match="data.sources.shapes: world: need 1 <= min_objects <= max_objects"):
        load_config(RECIPE / "heads.yaml", [f"{shapes}.world.max_objects=0"])
    with pytest.raises(ConfigError, match="mix: unknown ShapesWorld task 'sag' \\(did you mean 'seg'\\?\\)"):
        load_config(RECIPE / "heads.yaml", [f"{shapes}.mix.sag=1.0"])
    with pytest.raises(ConfigError, match="data.sources.shapes.kind: 'shapeworld' \\(did you mean 'shapesworld'"):
        load_config(RECIPE / "heads.yaml", [f"{shapes}.kind=shapeworld"])
    with pytest.raises(ConfigError, match="data.sources: no data source"):
        load_config(RECIPE / "heads.yaml", ["--data.sources={}"])


def test_bad_components_and_paths_fail_before_compute(tmp_path):
    with pytest.raises(ConfigError, match="unknown component 'visoin'.*did you mean 'vision'"):
        load_config(RECIPE / "heads.yaml", ["--stage.trainable.visoin=full"])
    with pytest.raises(ConfigError, match="freezes every component"):
        load_config(RECIPE / "heads.yaml", ["--stage.trainable.experts=frozen", "--stage.trainable.queries=frozen"])
    cfg = load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--stage.trainable.experts.pose=full"))
    with pytest.raises(ConfigError, match="experts.pose.*does not exist"):
        train(cfg)
    for key in ("expert_weights", "detach_context"):
        value = "{segm: 0.5}" if key == "expert_weights" else "[segm]"
        cfg = load_config(RECIPE / "joint.yaml", overrides(tmp_path, f"--stage.{key}={value}"))
        with pytest.raises(ConfigError, match=f"stage.{key} names unknown experts \\['segm'\\]"):
            train(cfg)
    cfg = load_config(RECIPE / "heads.yaml", overrides(tmp_path, "--data.sources={chat: {kind: llava, "
                                                                 "path: /nope.json}}"))
    with pytest.raises(ConfigError, match="data.sources.chat.path: '/nope.json' does not exist"):
        train(cfg)
    with pytest.raises(ConfigError, match="model.init"):
        train(load_config(RECIPE / "heads.yaml", [f"--out_dir={tmp_path}", f"--model.init={tmp_path / 'absent'}"]))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_from_incompatible_checkpoint(tmp_path):
    train(load_config(RECIPE / "heads.yaml", overrides(tmp_path / "a", "--max_steps=1")))
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000001"
    cfg = load_config(RECIPE / "assign.yaml", overrides(tmp_path / "b", f"--resume={ckpt}", "--max_steps=1"))
    with pytest.raises(CheckpointError, match="incompatible"):
        train(cfg)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
