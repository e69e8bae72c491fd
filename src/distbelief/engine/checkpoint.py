"""Checkpoints: written atomically, loaded without executing code.

A checkpoint is a dict of tensors and plain values saved with `torch.save`. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one, so a crash at
any moment leaves either the old or the new checkpoint, never a torn one. It is read with
`torch.load(weights_only=True)`, whose unpickler only builds tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import torch

from distbelief.errors import CheckpointError, StorageError, storage_error

FORMAT = "distbelief.checkpoint"
VERSION = 1
TMP_SUFFIX = ".tmp"  # of the temporary files atomic_write renames into place
_UMASK_LOCK = threading.Lock()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync, then rename it to
    `path`, readable as the umask allows (as any file a tool writes). On any failure the
    temporary file is removed and `path` is untouched.

    Raises:
        StorageError: the folder or file cannot be written (read-only or full disk, a path
            through a regular file, no permission), naming the path and the reason."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except FileExistsError as e:  # mkdir over a regular file
        raise StorageError(f"cannot write {path}: {e.filename} is not a folder") from None
    except OSError as e:
        raise storage_error("write", path, e) from None
    out = None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
            out = _Writes(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        failed = e if isinstance(e, OSError) else out and out.failed
        if failed:
            raise storage_error("write", path, failed) from None
        raise


class _Writes:
    """A file object that remembers the OSError its `write` raised: torch.save reports a full
    disk as a RuntimeError of its zip writer ("unexpected pos"), which hides the reason."""

    def __init__(self, f):
        self.f, self.failed = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.failed = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it is read by setting it, which
    is not thread-safe, hence the lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# A checkpoint whose model lies in other files (each shard's or partition's), not in "model".
PIECES = "pieces"


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save `state` (tensors, numbers, strings, lists, dicts) atomically at `path`."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu", assemble: bool = True,
                    mmap: bool = False) -> dict:
    """Load a checkpoint written by `save_checkpoint`. One that says where its model's pieces
    lie (`PIECES`, a partitioned run's last.pt) gets its "model" (and, for a single-mode
    run's, its "optimizer") assembled from them (`pieces.assemble`), unless not `assemble`.
    With `mmap` its tensors are views of the file (read as they are used: nothing is held
    twice).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, holds objects other than
            tensors and plain values, or is not a distbelief checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncation and corruption surface as many exception types
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or unsafe to load "
                              f"({type(e).__name__}: {reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distbelief checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; "
                              f"this distbelief reads version {VERSION}")
    if PIECES in state and "model" not in state and assemble:
        from distbelief.engine.pieces import assemble as assembled  # builds models: imported late

        state.update(assembled(state, path))
    return state


def load_model_state(model: torch.nn.Module, ckpt: dict, file, name: str) -> torch.nn.Module:
    """`model` loaded with the parameters of checkpoint `ckpt` (read from `file`).

    Raises:
        CheckpointError: `ckpt` has no model, or its tensors do not fit `name`."""
    try:
        model.load_state_dict(ckpt["model"])
    except KeyError as e:
        raise CheckpointError(f"{file} lacks {e}; not a training checkpoint") from None
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not fit {name} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return model
