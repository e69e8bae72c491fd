"""A model assembled from the pieces its parameter-server shards wrote: what a partitioned
Downpour run's last.pt points to instead of holding the model (`downpour.generation`).

The server's vector is the parts' blocks one after the other, each part's parameters then
its buffers (`distributed.flat.BlockFlat`); the parts are the model's `units` cut at the
recorded bounds. Each shard's file holds [lo, hi) of it. The model is built empty and each of
its tensors filled from the files, read memory-mapped: nothing but the model is held.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from distbelief.engine.checkpoint import PIECES
from distbelief.engine.config import TrainConfig
from distbelief.errors import CheckpointError
from distbelief.models.init import units


def pieces_folder(index: dict, path: Path) -> Path:
    """Where the pieces named in `index` (read from `path`) lie: beside it in its generation
    folder, or in that folder when `path` is the copy at checkpoints/last.pt."""
    folder = str(index[PIECES]["folder"])
    return path.parent if path.parent.name == folder else path.parent / folder


@torch.no_grad()
def assemble_model(index: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the model a piecewise checkpoint `index` (read from `path`) names.

    Raises:
        CheckpointError: a piece is missing (the run moved on to a newer generation: read
            again), unreadable, or does not fit the model."""
    from distbelief.engine.setup import build_model

    path = Path(path)
    try:
        layout, config = index[PIECES], TrainConfig.from_dict(index["config"])
        shape = SimpleNamespace(num_classes=index["num_classes"], in_chans=index["in_chans"],
                                stats=index["data_stats"])
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e}; not a training checkpoint") from None
    with torch.device("meta"):
        model = build_model(config, shape)
    model.to_empty(device="cpu")
    pieces, bounds = units(model), layout["bounds"]
    parts = [nn.Sequential(*(m for _, m in pieces[lo:hi])) for lo, hi in zip(bounds, bounds[1:])]
    order = [t for part in parts for t in [*part.parameters(), *part.buffers()]]
    slices = [(lo, hi, _vector(pieces_folder(index, path) / name, path))
              for name, lo, hi in layout["shards"]]
    start = 0
    for tensor in order:
        _fill(tensor, start, slices, path)
        start += tensor.numel()
    if start != slices[-1][1]:
        raise CheckpointError(f"{path}: the shards hold {slices[-1][1]} values, the model "
                              f"{start}")
    return model.state_dict()


def _vector(file: Path, index: Path) -> torch.Tensor:
    """The values of one shard's file, memory-mapped."""
    if not file.is_file():
        raise CheckpointError(f"{file}, a piece of {index}, is missing (a newer checkpoint "
                              f"replaced it: read the run again)")
    try:
        return torch.load(file, mmap=True, weights_only=True)["shard"]["w"]
    except Exception as e:
        raise CheckpointError(f"{file}, a piece of {index}, is unreadable "
                              f"({type(e).__name__})") from None


def _fill(tensor: torch.Tensor, start: int, slices: list, path: Path) -> None:
    """`tensor` from [start, start + its size) of the server's vector, across shards."""
    flat, end = tensor.view(-1), start + tensor.numel()
    for lo, hi, values in slices:
        a, b = max(lo, start), min(hi, end)
        if a < b:
            if values.numel() != hi - lo:
                raise CheckpointError(f"{path}: a piece holds {values.numel()} values, not "
                                      f"{hi - lo}")
            flat[a - start:b - start].copy_(values[a - lo:b - lo])
