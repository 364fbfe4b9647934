"""Checkpoint files: a directory of ``config.json`` + ``model.safetensors`` + ``tokenizer/`` (never pickle).

Writes are atomic: everything goes to a temporary sibling directory that replaces the target in one rename,
so an interrupted save leaves the previous checkpoint intact (``TaskMLLM.save_pretrained`` and the joint
model's save use :func:`atomic_directory_write`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def atomic_directory_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path`` in one rename (old content replaced last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
