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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace the file ``path`` with ``text`` atomically: a temporary sibling, fsynced, then renamed over it, so a
    crash leaves the old file or the new one, never half of one (and no temporary file behind)."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
