"""Checkpoints: written atomically, loaded without executing code.

A checkpoint is a dict of tensors and plain values saved with `torch.save`. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one, so a crash at
any moment leaves either the old or the new checkpoint, never a torn one. It is read with
`torch.load(weights_only=True)`, whose unpickler only builds tensors and plain containers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from distbelief.errors import CheckpointError

FORMAT = "distbelief.checkpoint"
VERSION = 1


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync, then rename it to
    `path`. On any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save `state` (tensors, numbers, strings, lists, dicts) atomically at `path`."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, holds objects other than
            tensors and plain values, or is not a distbelief checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncation and corruption surface as many exception types
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or unsafe to load "
                              f"({type(e).__name__}: {reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distbelief checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; "
                              f"this distbelief reads version {VERSION}")
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
