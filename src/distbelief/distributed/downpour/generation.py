"""A Downpour checkpoint generation, as both drivers (`trainer`, on Ray; `lockstep`, in one
process) write and read it. No Ray here.

    checkpoints/gen-N/downpour.pt   the driver's state: replica positions, counters, clock
    checkpoints/gen-N/shard-K.pt    shard K's snapshot (its slice, optimizer state, version)
    checkpoints/gen-N/last.pt       the model the snapshots hold together
"""

from __future__ import annotations

import numpy as np
import torch

from distbelief.distributed.server_model import ServerModel, as_tensors
from distbelief.engine.checkpoint import load_checkpoint
from distbelief.errors import CheckpointError

STATE = "downpour"  # checkpoints/downpour.pt
# Fixed for a run's life.
SAME = ("model", "variant", "replicas", "ps_shards", "partitions", "optimizer", "data")


def snapshot_name(k: int) -> str:
    return f"shard-{k}"  # checkpoints/shard-K.pt


def check_snapshots(run, shards: int) -> None:
    """Raise `CheckpointError` unless every shard's snapshot is in the run directory."""
    missing = [k for k in range(shards) if not run.state_file(snapshot_name(k)).is_file()]
    if missing:
        raise CheckpointError(f"{run.path} lacks the snapshot of shard(s) "
                              f"{', '.join(map(str, missing))}")


def load_snapshot(run, k: int) -> dict:
    """Shard k's snapshot in the checkpoint `run` resumes from."""
    return load_checkpoint(run.state_file(snapshot_name(k)))["shard"]


def save_generation(trainer, snapshots: list[dict], bounds) -> None:
    """One generation of `trainer` (its `life`, `config`, `server`, `progress`, `data`,
    `steps`) from its shards' `snapshots` (`ParameterShard.snapshot`, in shard order);
    `bounds`: the partition cut, or None. A server holding NaN or Inf never replaces a good
    checkpoint (`Diverged`)."""
    vector = torch.from_numpy(np.concatenate([snap["w"] for snap in snapshots]))
    ServerModel.check_finite(vector, trainer.steps)
    files = {snapshot_name(k): {"shard": as_tensors(snap)} for k, snap in enumerate(snapshots)}
    files["last"] = trainer.server.checkpoint(vector, trainer.steps, trainer.life.wall_s,
                                              "downpour")
    trainer.life.save_generation(trainer.config, {
        **trainer.progress.state(), "data_stats": trainer.data.stats,
        "partition_bounds": bounds}, files, trainer.steps)
