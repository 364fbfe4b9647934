"""Training checkpoints: atomic, keep-last-N, resumable; safetensors + JSON only (never pickle).

A checkpoint is ``<out_dir>/checkpoints/step-XXXXXXXX/``:

- ``model.safetensors`` — the training module's state (LoRA adapters included, tied weights once);
- ``optimizer.safetensors`` — every tensor of the optimizer state (``optimizer.rank<r>.safetensors`` per rank
  when the optimizer is partitioned, as under DeepSpeed ZeRO); its non-tensor structure goes into JSON;
- ``state.json`` — format version, step, data position, scheduler state, RNG states, model signature;
- ``train_config.yaml`` — the resolved config.

Each is written into a temporary sibling directory that is renamed into place (``atomic_directory_write``),
so a run killed mid-save leaves only complete checkpoints (temp directories start with ``.`` and are swept
at the next save). ZeRO handling is kept in this file: under ZeRO-2 every rank holds full weights, so rank 0
writes the model, and each rank writes its own optimizer partition.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from taskmllm.errors import CheckpointError
from taskmllm.model.io import atomic_directory_write
from taskmllm.training.config import TrainConfig, save_config

FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d{8})$")


# ------------------------------------------------------------------------------ nested state <-> flat
def flatten_state(obj: Any, prefix: str = "", tensors: Optional[dict] = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists into a JSON skeleton and ``{key: tensor}``; tensors become ``{"__tensor__": key}``."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "value"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        items = {}
        for k, v in obj.items():
            items[str(k)] = flatten_state(v, f"{prefix}.{k}" if prefix else str(k), tensors)[0]
        return {"__dict__": items, "__int_keys__": [str(k) for k in obj if isinstance(k, int)]}, tensors
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(v, f"{prefix}.{i}", tensors)[0] for i, v in enumerate(obj)],
                "__tuple__": isinstance(obj, tuple)}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise CheckpointError(prefix, f"cannot store a {type(obj).__name__} without pickle")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        ints = set(skeleton["__int_keys__"])
        return {(int(k) if k in ints else k): unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()}
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        seq = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
        return tuple(seq) if skeleton["__tuple__"] else seq
    return skeleton


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, JSON-able (torch states as byte lists)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def tied_names(module: nn.Module) -> dict[str, str]:
    """Each state entry that is a second name of an earlier entry's tensor (tied weights) -> that earlier name."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, t in module.state_dict().items():
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        if t.numel() and key in first:
            tied[name] = first[key]
        else:
            first.setdefault(key, name)
    return tied


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state to save: tied entries once, each tensor copied into its own storage.

    (Under DeepSpeed ZeRO every trainable parameter is a view into one flat buffer, which safetensors'
    ``save_model`` refuses to write.)
    """
    tied = tied_names(module)
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in module.state_dict().items() if k not in tied}


def load_module_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` into ``module`` in place (so ZeRO's flat buffers stay intact); every entry must be
    covered, a tied entry by any one of its names."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    tied = tied_names(module)
    present = {tied.get(k, k) for k in tensors}
    missing = [k for k in missing if tied.get(k, k) not in present]
    if missing or unexpected:
        raise CheckpointError(path, f"model.safetensors does not fit: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")


def model_signature(module: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every entry of the module's state (what a compatible checkpoint must match)."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the parameters the stage trains (what the optimizer state is about)."""
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Saves and finds checkpoints under ``root`` (``<out_dir>/checkpoints``)."""

    def __init__(self, root: str | Path, keep_last: int, rank: int = 0, world_size: int = 1) -> None:
        self.root, self.keep_last, self.rank, self.world_size = Path(root), keep_last, rank, world_size

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary directories are never listed)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))

    def latest(self) -> Optional[Path]:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, module: nn.Module, optimizer: Any, scheduler: Any, data_position: int,
             cfg: TrainConfig, partitioned_optimizer: bool = False) -> Path:
        """Write checkpoint ``step`` atomically (rank 0 writes; partitioned optimizers write one file per rank)."""
        from safetensors.torch import save_file

        path = self.root / f"step-{step:08d}"
        opt_skeleton, opt_tensors = flatten_state(optimizer.state_dict())
        if partitioned_optimizer and self.world_size > 1:  # ZeRO: each rank owns a slice of the optimizer state
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(opt_tensors, str(self.root / f".opt-step-{step:08d}.rank{self.rank}.safetensors"))
            _barrier()
        if self.rank == 0:
            self._write(path, step, module, opt_skeleton, opt_tensors, scheduler, data_position, cfg,
                        partitioned_optimizer)
        _barrier()
        return path

    def _write(self, path: Path, step: int, module: nn.Module, opt_skeleton: Any, opt_tensors: dict,
               scheduler: Any, data_position: int, cfg: TrainConfig, partitioned_optimizer: bool) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step-*"):  # temp dirs of a save that was killed
            shutil.rmtree(stale, ignore_errors=True)

        def write(tmp: Path) -> None:
            save_file(module_tensors(module), str(tmp / "model.safetensors"))
            if partitioned_optimizer and self.world_size > 1:
                for r in range(self.world_size):
                    src = self.root / f".opt-step-{step:08d}.rank{r}.safetensors"
                    src.rename(tmp / f"optimizer.rank{r}.safetensors")
            else:
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            state = {"format": FORMAT, "step": step, "data_position": data_position,
                     "world_size": self.world_size, "partitioned_optimizer": partitioned_optimizer,
                     "optimizer": opt_skeleton, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "signature": model_signature(module), "trainable": trainable_names(module)}
            (tmp / "state.json").write_text(json.dumps(state))
            save_config(cfg, tmp / "train_config.yaml")

        atomic_directory_write(path, write)
        self._prune()

    def _prune(self) -> None:
        for old in self.list()[:-self.keep_last]:
            trash = old.parent / f".step-trash-{uuid.uuid4().hex[:8]}"
            old.rename(trash)  # a half-deleted directory never looks like a checkpoint
            shutil.rmtree(trash, ignore_errors=True)

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from: ``auto`` -> latest (or None), ``none`` -> None, else the path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        return Path(resume)

    def check(self, path: Path, module: nn.Module) -> dict:
        """Read ``state.json`` and verify the checkpoint fits ``module`` — before any compute starts."""
        for name in ("state.json", "model.safetensors"):
            if not (path / name).is_file():
                raise CheckpointError(path / name, "missing: not a complete training checkpoint")
        try:
            state = json.loads((path / "state.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(path / "state.json", f"corrupt: {exc}") from exc
        if state.get("format") != FORMAT:
            raise CheckpointError(path, f"checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
        want, got = model_signature(module), state["signature"]
        if want != got:
            missing = sorted(set(want) - set(got))[:3]
            extra = sorted(set(got) - set(want))[:3]
            shapes = [k for k in set(want) & set(got) if want[k] != got[k]][:3]
            raise CheckpointError(path, "incompatible with this run's model/stage: "
                                  f"missing {missing}, unexpected {extra}, other shapes {shapes}")
        trained = state.get("trainable")
        if trained is not None and trained != trainable_names(module):  # same model, another stage's optimizer
            now = set(trainable_names(module))
            raise CheckpointError(path, "incompatible with this run's stage: it trained "
                                  f"{len(trained)} parameter tensors, this stage trains {len(now)} "
                                  f"(e.g. only there: {sorted(set(trained) - now)[:2]}, only here: "
                                  f"{sorted(now - set(trained))[:2]})")
        if state["partitioned_optimizer"] and state["world_size"] != self.world_size:
            raise CheckpointError(path, f"optimizer partitioned over {state['world_size']} ranks, "
                                  f"this run has {self.world_size}")
        return state

    def load_module(self, path: Path, module: nn.Module) -> None:
        """Restore the module's weights from a checked checkpoint (in place)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            load_module_tensors(module, load_file(str(path / "model.safetensors"),
                                                  device=str(next(module.parameters()).device)), path)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(path, f"cannot load: {exc}") from exc

    def load(self, path: Path, state: dict, module: Optional[nn.Module], optimizer: Any, scheduler: Any) -> dict:
        """Restore module (unless None: :meth:`load_module` did), optimizer, scheduler and RNG from a checked
        checkpoint; returns ``state``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if module is not None:
            self.load_module(path, module)
        try:
            name = (f"optimizer.rank{self.rank}.safetensors" if state["partitioned_optimizer"]
                    else "optimizer.safetensors")
            tensors = load_file(str(path / name))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(path, f"cannot load: {exc}") from exc
        optimizer.load_state_dict(unflatten_state(state["optimizer"], tensors))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
