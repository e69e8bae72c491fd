"""Weights in torchvision's format: a plain state dict (module names to tensors) saved with
`torch.save`. Our ResNets use torchvision's module names, so such a file moves between the two
with `strict=True` both ways: `--init-from` starts a run from one, `distbelief export` writes
one from a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distbelief.engine.checkpoint import PIECES, atomic_write, load_checkpoint
from distbelief.errors import CheckpointError, ConfigError


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in `path` (a plain one, or one under "state_dict" or "model").

    Raises:
        ConfigError: the file is missing, unreadable or holds no state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-from {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corruption surfaces as many exception types
        raise ConfigError(f"--init-from {path} is not a readable state dict "
                          f"({type(e).__name__}: {str(e).strip()[:120]})") from None
    if isinstance(state, dict) and PIECES in state and "model" not in state:
        try:  # a partitioned run's checkpoint: its model lies in its pieces
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise ConfigError(f"--init-from {e}") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ConfigError(f"--init-from {path} holds no state dict (module names to tensors)")
    return state


def load_init(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` loaded with `config.init_from`'s weights, strictly, when that is set.

    Raises:
        ConfigError: the file is unusable or does not fit the model (names or shapes)."""
    if not config.init_from:
        return model
    state = read_state_dict(config.init_from)
    mine = model.state_dict()
    missing = sorted(mine.keys() - state.keys())
    unexpected = sorted(state.keys() - mine.keys())
    resized = sorted(k for k in mine.keys() & state.keys() if mine[k].shape != state[k].shape)
    if missing or unexpected or resized:
        parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected),
                                     ("other shapes:", resized)) if names]
        raise ConfigError(f"--init-from {config.init_from} does not fit {config.model}: "
                          f"{'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def export_state_dict(run: str | os.PathLike, out: str | os.PathLike) -> tuple[int, str | None]:
    """Write the model of `run` (a run directory or a checkpoint file) to `out` as a plain
    state dict; returns (the number of tensors, a caveat or None). The caveat: a bottleneck
    ResNet of the paper's variant has torchvision's names and shapes but strides elsewhere, so
    torchvision's model loads it and computes something else.

    Raises:
        CheckpointError: no checkpoint there, or `out` exists (it is never overwritten)."""
    run, out = Path(run), Path(out)
    file = run / "checkpoints" / "last.pt" if run.is_dir() else run
    ckpt = load_checkpoint(file)
    if "model" not in ckpt:
        raise CheckpointError(f"{file} holds no model; not a training checkpoint")
    if out.exists():
        raise CheckpointError(f"{out} exists; choose another file (it is never overwritten)")
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    atomic_write(out, lambda f: torch.save(state, f))
    saved = ckpt.get("config", {})
    bottleneck = any(k.endswith(".conv3.weight") for k in state)
    caveat = None
    if bottleneck and saved.get("variant") in (None, "paper") and saved.get("model") != "custom":
        caveat = (f"{saved.get('model')} was trained as the paper's variant (stride in the "
                  f"first 1x1 conv); torchvision's model loads these weights but strides in "
                  f"the 3x3 conv: train with --variant v1.5 to use them there")
    return len(state), caveat
