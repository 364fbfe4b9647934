"""Files: checkpoint directories, their checksums, and the checks on paths a user hands in or asks to write.

A checkpoint is a directory of ``config.json`` + ``model.safetensors`` + ``tokenizer/`` (never pickle), plus
``checksums.json``: the SHA-256 of every ``*.safetensors`` file under it, recorded at save and checked at load
(:func:`verify_checksums`), so a weight file changed after it was written is a :class:`CheckpointError`, not a
model that silently answers ``""``.

Writes are atomic: everything goes to a temporary sibling directory that replaces the target in one rename,
so an interrupted save leaves the previous checkpoint intact (``TaskMLLM.save_pretrained`` and the joint
model's save use :func:`atomic_directory_write`; single files :func:`atomic_write_bytes`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterable, Optional, Union

from taskmllm.errors import CheckpointError, ConfigError, InputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"

PathLike = Union[str, Path]


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


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file renamed into place (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- checksums
def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_checksums(directory: PathLike) -> Path:
    """Write ``checksums.json``: the SHA-256 of every ``*.safetensors`` file under ``directory`` (relative paths).

    Called last by every checkpoint writer, inside its atomic write, so the sums describe exactly what is renamed
    into place."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*.safetensors"))}
    out = directory / CHECKSUMS_FILE
    out.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")
    return out


def read_checksums(directory: PathLike) -> dict[str, str]:
    """``{relative file: SHA-256}`` of ``directory``'s ``checksums.json`` (``{}`` without one).

    Raises:
        CheckpointError: the file is unreadable or not the format :func:`record_checksums` writes.
    """
    sums_file = Path(directory) / CHECKSUMS_FILE
    if not sums_file.is_file():
        return {}
    try:
        recorded = json.loads(sums_file.read_text())["files"]
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            raise TypeError("'files' is not a mapping of names to hex digests")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(sums_file, f"unreadable checksum file ({exc})") from exc
    return recorded


def verify_checksums(directory: PathLike, names: Iterable[str]) -> None:
    """Check the files ``names`` (relative to ``directory``) against its ``checksums.json``.

    A checkpoint without ``checksums.json`` (written before checksums existed) has nothing to check; a file the
    sums do not list is not checked.

    Raises:
        CheckpointError: ``checksums.json`` is unreadable, or a listed file is missing or differs from what was
            saved (the message names the file).
    """
    directory = Path(directory)
    recorded = read_checksums(directory)
    for name in names:
        want = recorded.get(name)
        if want is None:
            continue
        file = directory / name
        if not file.is_file():
            raise CheckpointError(file, "missing: the checkpoint's checksums.json lists it")
        got = sha256_file(file)
        if got != want:
            raise CheckpointError(file, f"SHA-256 {got[:12]}… differs from the {want[:12]}… recorded at save: "
                                  "the file was changed or corrupted after it was written")


# ------------------------------------------------------------------------------------------------ paths
def show_path(path: PathLike, limit: int = 120) -> str:
    """``path`` for a message, its middle elided when longer than ``limit`` characters."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-limit // 2:]} ({len(text)} characters)"


def check_input_file(path: PathLike, what: str, error: type = InputError) -> os.stat_result:
    """``stat`` of the regular, non-empty file ``path``, or ``error`` naming why it cannot be read.

    Distinguishes a missing file, a name too long for the file system, a symlink loop, a parent that is a file,
    no permission, a directory, a FIFO/socket/device, and an empty file.
    """
    shown = show_path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        reason = {errno.ENOENT: "not found", errno.ENAMETOOLONG: "the path is too long for the file system",
                  errno.ELOOP: "a symbolic link loop", errno.ENOTDIR: "a parent of it is not a directory",
                  errno.EACCES: "permission denied"}.get(exc.errno, exc.strerror or "cannot be read")
        raise error(f"{what} file {shown}: {reason}") from exc
    except ValueError as exc:  # an embedded NUL character
        raise error(f"{what} file {shown}: not a valid path ({exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} file {shown}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} file {shown}: is not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise error(f"{what} file {shown}: is empty")
    return info


def check_output_file(path: PathLike, what: str) -> Path:
    """``path`` as a file that can be written (created or replaced), or :class:`ConfigError` naming why not:
    it is a directory, a parent of it is a file, or the name is too long."""
    path = Path(path)
    info = _stat_or_none(path, what)
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {show_path(path)} is a directory; give a file name")
    _check_parents(path, what)
    return path


def check_output_dir(path: PathLike, what: str) -> Path:
    """``path`` as a directory that can be created or written into, or :class:`ConfigError` naming why not:
    it is an existing file, a parent of it is a file, or the name is too long."""
    path = Path(path)
    info = _stat_or_none(path, what)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {show_path(path)} is an existing file; give a directory")
    _check_parents(path, what)
    return path


def _stat_or_none(path: Path, what: str) -> Optional[os.stat_result]:
    """``stat`` of ``path``, None when nothing is there; :class:`ConfigError` for a path that cannot exist."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"{what} {show_path(path)}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # an embedded NUL character
        raise ConfigError(f"{what} {show_path(path)}: not a valid path ({exc})") from exc


def _check_parents(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory."""
    for folder in path.parents:
        info = _stat_or_none(folder, what)
        if info is not None:
            if not stat.S_ISDIR(info.st_mode):
                raise ConfigError(f"{what} {show_path(path)}: {show_path(folder)} is a file, not a directory")
            return


# ------------------------------------------------------------------------------------------------ weights
def check_finite_weights(module, file: PathLike) -> None:
    """:class:`CheckpointError` naming the first floating-point tensor of ``module`` (loaded from ``file``) that
    holds NaN or infinite values — corrupt weights that would make every answer empty."""
    check_finite_tensors(module.state_dict(), file)


def check_finite_tensors(tensors, file: PathLike) -> None:
    """:func:`check_finite_weights` of a mapping ``name -> tensor`` (e.g. a safetensors file's content)."""
    import torch

    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(file, f"tensor {name!r} holds {bad} NaN or infinite value(s): the weights are "
                                      "corrupt")
