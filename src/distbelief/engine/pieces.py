"""Checkpoints written in pieces by the processes that hold them, and the model (and optimizer)
assembled from them only when asked: what a partitioned run's last.pt points to instead of
holding the model (its `PIECES` entry).

Two kinds of pieces:

- "shards" (partitioned Downpour, `downpour.generation`): the server's vector is the parts'
  blocks one after the other, each part's parameters then its buffers
  (`distributed.flat.BlockFlat`); the parts are the model's `units` cut at the recorded bounds.
  Each shard's file holds [lo, hi) of it.
- "parts" (single mode with --partitions, `pipeline.trainer`): each partition's file holds its
  tensors and its optimizer's per-parameter state under their unit names ("<unit>.<name in
  the unit>", `units` naming the units), so that any cut, or none, reads them back by name.

The model is built empty and each of its tensors filled from the files, read memory-mapped:
nothing but the model is held. The writers and the driver agree on the generation folder
through a marker file (`begin_pieces`, `sees`): a process that does not see it (another
machine, no shared filesystem) sends its piece through the driver instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from distbelief.engine.checkpoint import PIECES, save_checkpoint
from distbelief.engine.config import TrainConfig
from distbelief.errors import CheckpointError
from distbelief.models.init import units


def pieces_folder(index: dict, path: Path) -> Path:
    """Where the pieces named in `index` (read from `path`) lie: beside it in its generation
    folder, or in that folder when `path` is the copy at checkpoints/last.pt."""
    folder = str(index[PIECES]["folder"])
    return path.parent if path.parent.name == folder else path.parent / folder


MARKER = ".driver"  # in a generation being written: what tells a writer it sees the folder


def fingerprint(path: str | os.PathLike) -> tuple[int, int]:
    """(size, modification time in ns) of `path`: what another process compares (`sees`)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def sees(path: str | os.PathLike, seen: tuple[int, int]) -> bool:
    """Whether this process sees at `path` the file the driver saw as `seen` (`fingerprint`):
    on another machine, a local folder of the same name holds no such file."""
    try:
        return fingerprint(path) == tuple(seen)
    except OSError:
        return False


def begin_pieces(run) -> tuple[Path, tuple[int, int]]:
    """A new generation folder of `run` (a `RunDir`) for the pieces' writers, and the
    fingerprint of its marker (`sees`)."""
    folder = run.new_generation()
    (folder / MARKER).write_text(f"{os.getpid()}@{os.uname().nodename} {time.time_ns()}\n")
    return folder, fingerprint(folder / MARKER)


def assemble(index: dict, path: str | Path) -> dict:
    """What a piecewise checkpoint `index` (read from `path`) lacks: its "model" state dict,
    and for pieces of kind "parts" its "optimizer" state dict (the whole model's numbering).

    Raises:
        CheckpointError: a piece is missing (the run moved on to a newer generation: read
            again), unreadable, or does not fit the model."""
    path = Path(path)
    model = _empty_model(index, path)
    layout = index[PIECES]
    if layout.get("kind", "shards") == "shards":
        return {"model": _from_shards(model, layout, index, path)}
    pieces = [read_piece(pieces_folder(index, path) / name, path) for name in layout["parts"]]
    return from_parts(model, pieces, path)


def _empty_model(index: dict, path: Path) -> nn.Module:
    """The checkpoint's model, allocated on the CPU with no values set."""
    from distbelief.engine.setup import build_model

    try:
        config = TrainConfig.from_dict(index["config"])
        shape = SimpleNamespace(num_classes=index["num_classes"], in_chans=index["in_chans"],
                                stats=index["data_stats"])
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e}; not a training checkpoint") from None
    with torch.device("meta"):
        model = build_model(config, shape)
    return model.to_empty(device="cpu")


@torch.no_grad()
def _from_shards(model: nn.Module, layout: dict, index: dict, path: Path
                 ) -> dict[str, torch.Tensor]:
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
    return _read(file, index)["shard"]["w"]


def read_piece(file: str | os.PathLike, index: str | os.PathLike | None = None) -> dict:
    """One partition's piece (`to_piece`) of the checkpoint `index` (named in errors, where
    known), memory-mapped.

    Raises:
        CheckpointError: it is missing or unreadable."""
    return _read(Path(file), index)["part"]


def _read(file: Path, index=None) -> dict:
    what = f"{file}, a piece of {index}," if index is not None else f"{file}, a checkpoint piece,"
    if not file.is_file():
        raise CheckpointError(f"{what} is missing (a newer checkpoint replaced it: read the run "
                              f"again)")
    try:
        return torch.load(file, mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} is unreadable ({type(e).__name__})") from None


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


# --- pieces of kind "parts": a partition's tensors and optimizer state, by unit name ---------

def unit_keys(names: list[str], keys) -> list[str]:
    """The unit names of a part's state-dict or parameter `keys` ("<i>.<rest>", i the unit's
    place in the part, whose units are named `names`)."""
    out = []
    for key in keys:
        i, _, rest = key.partition(".")
        out.append(f"{names[int(i)]}.{rest}")
    return out


def to_piece(state: dict, module: nn.Module, names: list[str]) -> dict:
    """A partition's piece from its `Stage.state()` (`state`) over `module`, an nn.Sequential
    of the units named `names`: {"module": unit name -> tensor, "optimizer": None or
    {"state": parameter's unit name -> its state, "group": the hyper-parameters}}."""
    keys = unit_keys(names, state["module"].keys())
    piece = {"module": dict(zip(keys, state["module"].values())), "optimizer": None}
    opt = state["optimizer"]
    if opt is not None:
        params = unit_keys(names, [k for k, _ in module.named_parameters()])
        (group,) = opt["param_groups"]
        piece["optimizer"] = {
            "state": {params[int(i)]: v for i, v in opt["state"].items()},
            "group": {k: v for k, v in group.items() if k != "params"}}
    return piece


def from_pieces(pieces: list[dict], module: nn.Module, names: list[str]) -> dict:
    """The `Stage.state()` of the part `module` (the units named `names`) read from `pieces`
    (`to_piece`'s, of any cut of the same model), taking only its own tensors.

    Raises:
        CheckpointError: a tensor of the part is in none of the pieces."""
    values, states, group = {}, {}, None
    for piece in pieces:
        values.update(piece["module"])
        if piece["optimizer"] is not None:
            states.update(piece["optimizer"]["state"])
            group = group or piece["optimizer"]["group"]
    keys = list(module.state_dict().keys())
    missing = [k for k in unit_keys(names, keys) if k not in values]
    if missing:
        raise CheckpointError(f"the checkpoint's pieces lack {', '.join(missing[:4])}")
    out = {"module": {k: values[u] for k, u in zip(keys, unit_keys(names, keys))},
           "optimizer": None}
    params = unit_keys(names, [k for k, _ in module.named_parameters()])
    if params and group is not None:
        out["optimizer"] = {"state": {i: states[u] for i, u in enumerate(params) if u in states},
                            "param_groups": [{**group, "params": list(range(len(params)))}]}
    return out


def from_parts(model: nn.Module, pieces: list[dict], path: Path) -> dict:
    """{"model", "optimizer"}: the whole `model`'s state dict and optimizer state dict (one
    parameter group, numbered as `model.parameters()`) from partitions' `pieces`."""
    seq = nn.Sequential(*(unit for _, unit in units(model)))
    names = [name for name, _ in units(model)]
    try:
        state = from_pieces(pieces, seq, names)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.no_grad():
        seq.load_state_dict(state["module"])  # the units share the model's tensors
    return {"model": model.state_dict(), "optimizer": state["optimizer"]}


def write_part(state: dict, module: nn.Module, names: list[str], path: str | os.PathLike
               ) -> dict:
    """A partition's piece (`to_piece` of its `state`) written atomically at `path`; returns
    {"finite": whether its tensors are all finite}."""
    piece = to_piece(state, module, names)
    save_checkpoint(path, {"part": piece})
    return {"finite": all(bool(torch.isfinite(t).all()) for t in piece["module"].values()
                          if t.is_floating_point())}
