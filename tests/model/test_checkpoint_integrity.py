"""Checkpoint integrity: SHA-256 of every weight file recorded at save and checked at load, NaN/inf weights refused,
extra files (a run's config) inside the same atomic rename. The oracle for the sums is ``hashlib`` itself."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.router.joint import JointModel
from taskmllm.router.pipeline import Pipeline
from taskmllm.zoo import SHIPPED

WEIGHT_FILES = ["experts/det/model.safetensors", "experts/seg/model.safetensors", "experts/track/model.safetensors",
                "model.safetensors"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")


def _overwrite(path, offset_from_end: int = 4096, size: int = 1024, byte: int = 0xFF) -> None:
    """Overwrite ``size`` bytes of tensor data (0xFF bytes are float32 NaNs)."""
    data = bytearray(path.read_bytes())
    start = len(data) - offset_from_end
    data[start:start + size] = bytes([byte]) * size
    path.write_bytes(bytes(data))


def test_save_records_the_sha256_of_every_weight_file(tiny_checkpoint):
    sums = json.loads((tiny_checkpoint / "checksums.json").read_text())
    assert sums["algorithm"] == "sha256" and sorted(sums["files"]) == WEIGHT_FILES
    for name, digest in sums["files"].items():
        assert digest == _sha(tiny_checkpoint / name)


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_one_kilobyte_overwritten_is_a_checkpoint_error_naming_the_file(copy, name):
    _overwrite(copy / name)
    with pytest.raises(CheckpointError, match=rf"{name}: SHA-256 [0-9a-f]{{12}}… differs from the [0-9a-f]{{12}}… "
                                              r"recorded at save"):
        Pipeline.from_pretrained(copy)


def test_without_checksums_nan_weights_are_still_refused(copy):
    (copy / "checksums.json").unlink()  # a checkpoint written before checksums existed
    _overwrite(copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '[\w.]+' holds 256 NaN or infinite "
                                              r"value\(s\): the weights are corrupt"):
        JointModel.from_pretrained(copy)
    loaded = JointModel.from_pretrained(copy, verify=False)  # the documented escape hatch loads what is there
    assert any(not np.isfinite(p.detach().numpy()).all() for p in loaded.parameters())


def test_a_listed_file_that_is_missing_and_an_unreadable_sum_file(copy):
    sums = json.loads((copy / "checksums.json").read_text())
    (copy / "checksums.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checksums.json: unreadable checksum file"):
        JointModel.from_pretrained(copy)
    sums["files"]["experts/seg/model.safetensors"] = "0" * 64
    (copy / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match=r"experts/seg/model.safetensors: SHA-256"):
        JointModel.from_pretrained(copy)


@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_shipped_checkpoints_carry_matching_checksums(model):
    folder = SHIPPED[model]
    sums = json.loads((folder / "checksums.json").read_text())["files"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert sorted(sums) == on_disk
    for name, digest in sums.items():
        assert digest == _sha(folder / name), name


def test_extra_files_share_the_atomic_rename(tiny_joint, tmp_path):
    path = tmp_path / "final"
    tiny_joint.save_pretrained(path, extra={"train_config.yaml": "stage: {name: one}\n"})
    assert (path / "train_config.yaml").read_text() == "stage: {name: one}\n"
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(TypeError):  # a write that fails half-way (after the weights were written)
        tiny_joint.save_pretrained(path, extra={"train_config.yaml": object()})
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before  # the previous checkpoint is intact: no weights without their config
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # and no temporary directory is left


def test_bad_device_is_named_not_reported_as_unreadable_weights(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"unknown device 'foo': use 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        Pipeline.from_pretrained(tiny_checkpoint, device="foo")
    with pytest.raises(ConfigError, match=r"device 'cuda:7' is not available: this machine has \d+ CUDA device"):
        Pipeline.from_pretrained(tiny_checkpoint, device="cuda:7")


def test_nan_in_an_adapter_is_refused_before_its_base_is_built(tokenizer, tiny_checkpoint, tmp_path):
    import shutil as sh

    import torch

    from taskmllm.model.adapter import write_adapter
    from taskmllm.model.mllm import TaskMLLM
    from tests.conftest import tiny_config

    built = []

    def little() -> TaskMLLM:
        built.append(1)
        return TaskMLLM(tiny_config(tokenizer), tokenizer)

    path = tmp_path / "adapter"
    sh.copytree(tiny_checkpoint, path, ignore=sh.ignore_patterns("model.safetensors", "checksums.json"))
    name = "projector.linear_1.weight"
    write_adapter(path, {f"full.{name}": torch.full((64, 32), float("nan"))}, "little", {})
    with pytest.raises(CheckpointError, match=rf"adapter.safetensors: tensor 'full.{name}' holds 2048 NaN"):
        TaskMLLM.from_pretrained(path, bases={"little": little})
    assert built == []  # refused from the file alone
